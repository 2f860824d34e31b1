"""The VFM interface, its typed configuration and the registry: any backbone returning dense features
(B, C, h, w) can guide a method."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch
import torch.nn as nn

from .._registry import Registry
from ..config import IMAGENET_MEAN, IMAGENET_STD
from ..errors import InvalidTypeError

__all__ = ["VFM", "VFMCfg", "VFMS", "register_vfm", "create_vfm", "list_vfms", "get_vfm_cfg"]


class VFM(nn.Module):
    """Base class of vision foundation models used as proxy-attention sources.

    Subclasses set ``mean``/``std`` (input normalisation, 0-1 scale), ``patch_size`` (effective stride of the
    feature map) and ``embed_dim`` (channels), and implement ``forward_features``.
    """

    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    patch_size: int = 16
    embed_dim: int = 0

    def grid_size(self, height: int, width: int) -> Tuple[int, int]:
        """Feature grid for an input of (height, width)."""
        return height // self.patch_size, width // self.patch_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) normalised with ``mean``/``std`` -> (B, embed_dim, h, w)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


@dataclass(frozen=True)
class VFMCfg:
    """What a registered VFM is, in one place: the family builder, the timm model it is built from (if any), the
    official release file, the input normalisation and the family's own options.

    Values left ``None`` come from timm's pretrained configuration of ``timm_name`` (``url``, ``mean``, ``std``)
    when timm has them, so they are not copied by hand (:meth:`resolved`).

    Attributes:
        name: registry name (``dino_b8``).
        builder: the family builder, called as ``builder(cfg=resolved cfg, weights=..., seed=..., **options)``.
        doc: one line for listings.
        timm_name: ``architecture.tag`` in timm (``vit_base_patch8_224.dino``).
        release_url: where the official release file lives (default: timm's ``url``).
        mean, std: input normalisation on the 0-1 scale (default: timm's, else ImageNet's).
        pos_mode: the positional-embedding resize rule of the family's own code (``ovseg.pos_embed``).
        convert: maps a release file's keys to the model's.
        requires: optional packages as (module, extra) pairs, checked before anything is built.
        options: the family's further builder options (e.g. Stable Diffusion's hub repository and configs).
    """

    name: str
    builder: Callable[..., nn.Module]
    doc: str = ""
    timm_name: Optional[str] = None
    release_url: Optional[str] = None
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    pos_mode: str = "legacy"
    convert: Optional[Callable[..., Dict[str, torch.Tensor]]] = None
    requires: Tuple[Tuple[str, str], ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def release_file(self) -> Optional[str]:
        """The release file's name (the last part of ``release_url``)."""
        return os.path.basename(urlparse(self.release_url).path) if self.release_url else None

    def timm_pretrained(self) -> Any:
        """timm's pretrained configuration of ``timm_name`` (None without one)."""
        if not self.timm_name:
            return None
        import timm

        return timm.models.get_pretrained_cfg(self.timm_name)

    def resolved(self) -> "VFMCfg":
        """A copy with ``release_url``, ``mean`` and ``std`` filled from timm's pretrained configuration (ImageNet
        statistics when neither the config nor timm gives them)."""
        pre = self.timm_pretrained()
        url = self.release_url or (getattr(pre, "url", None) or None)
        mean = self.mean or (tuple(pre.mean) if pre is not None and pre.mean else IMAGENET_MEAN)
        std = self.std or (tuple(pre.std) if pre is not None and pre.std else IMAGENET_STD)
        return replace(self, release_url=url, mean=tuple(mean), std=tuple(std))

    @property
    def hub_repo(self) -> Optional[str]:
        """The Hugging Face repository the official weights come from (timm's ``hf_hub_id`` or the family's)."""
        repo = self.options.get("repo_id")
        if repo is None:
            pre = self.timm_pretrained()
            repo = getattr(pre, "hf_hub_id", None) if pre is not None else None
        return repo.rstrip("/") if repo else None


VFMS = Registry("vfm", "list_vfms")


def _build_from_cfg(*, cfg: VFMCfg, **kwargs: Any) -> nn.Module:
    return cfg.builder(cfg=cfg.resolved(), **kwargs)


def register_vfm(
    name: Any,
    builder: Optional[Callable[..., nn.Module]] = None,
    *,
    doc: str = "",
    requires: Sequence[Tuple[str, str]] = (),
    overwrite: bool = False,
    **defaults: Any,
):
    """Register a VFM: a :class:`VFMCfg`, or a builder under ``name`` (usable as a decorator).

    A builder is called as ``builder(weights=..., seed=..., **defaults)`` and must return an ``nn.Module`` with
    ``mean``, ``std``, ``patch_size``, ``embed_dim`` attributes and ``forward_features(x) -> (B, C, h, w)``
    (subclassing :class:`VFM` gives sensible defaults). ``weights`` is None (the official weights), ``"random"``,
    or a local path.
    """
    if isinstance(name, VFMCfg):
        cfg = name
        return VFMS.register(cfg.name, _build_from_cfg, doc=cfg.doc, requires=cfg.requires, overwrite=overwrite,
                             cfg=cfg)
    return VFMS.register(name, builder, doc=doc, requires=requires, overwrite=overwrite, **defaults)


def get_vfm_cfg(name: str) -> Optional[VFMCfg]:
    """The typed configuration of a registered VFM (None for VFMs registered as plain builders)."""
    return VFMS.get(name).defaults.get("cfg")


def create_vfm(name: str, weights: Any = None, *, seed: int = 0, **overrides: Any) -> nn.Module:
    """Build a registered VFM in eval mode with gradients off."""
    model = VFMS.create(name, weights=weights, seed=seed, **overrides)
    for attr in ("mean", "std", "patch_size", "embed_dim", "forward_features"):
        if not hasattr(model, attr):
            raise InvalidTypeError(f"VFM '{name}' builder returned {type(model).__name__} without '{attr}'")
    return model.eval().requires_grad_(False)


def list_vfms(pattern: str = "*") -> List[str]:
    """Names of the registered VFMs."""
    return VFMS.names(pattern)


def describe_vfms() -> Dict[str, str]:
    return VFMS.describe()
