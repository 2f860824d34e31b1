"""The mask-generator interface, its typed configuration and the registry (docs/masks.md).

A mask generator turns an RGB image into a *region map*: an integer label image of the image's size in which
equal values form one class-agnostic region and 0 marks pixels no mask covers. CorrCLIP (docs/methods.md,
"CorrCLIP") restricts its attention to such regions and votes per region.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn as nn

from .._registry import Registry, suggest
from ..errors import InvalidInputError, InvalidTypeError

__all__ = [
    "MaskGenerator", "MaskGeneratorCfg", "MASK_GENERATORS", "register_mask_generator", "create_mask_generator",
    "list_mask_generators", "get_mask_generator_cfg", "describe_mask_generators", "check_settings",
]


class MaskGenerator(nn.Module):
    """Base class of mask generators: an ``nn.Module`` (so ``.to()`` moves its model) with :meth:`generate`.

    Attributes:
        name: the registered name.
        settings: the automatic-mask-generation settings in use (JSON-able), for provenance.
    """

    name: str = "mask_generator"

    def __init__(self) -> None:
        super().__init__()
        self.settings: Dict[str, Any] = {}

    def generate(self, image: np.ndarray) -> torch.Tensor:
        """uint8 RGB (H, W, 3) -> (H, W) int64 region map on the CPU; 0 = covered by no mask."""
        raise NotImplementedError

    def forward(self, image: np.ndarray) -> torch.Tensor:
        return self.generate(image)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.settings.items())


@dataclass(frozen=True)
class MaskGeneratorCfg:
    """What a registered mask generator is, in one place.

    Attributes:
        name: registry name (``sam2_hiera_l``).
        builder: the family builder, called as ``builder(cfg=cfg, weights=..., seed=..., **options)``.
        doc: one line for listings.
        model: the family's own model identifier (SAM 2: its hydra config; SAM: its encoder size).
        release_url: where Meta's release checkpoint lives.
        settings: the automatic-mask-generation settings (overridable per call of the builder).
        requires: optional packages as (module, extra) pairs, checked before anything is built.
    """

    name: str
    builder: Callable[..., MaskGenerator]
    doc: str = ""
    model: str = ""
    release_url: Optional[str] = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    requires: Tuple[Tuple[str, str], ...] = ()

    @property
    def release_file(self) -> Optional[str]:
        """The release checkpoint's file name (the last part of ``release_url``)."""
        return os.path.basename(urlparse(self.release_url).path) if self.release_url else None


MASK_GENERATORS = Registry("mask generator", "masks.list_mask_generators")


def _build_from_cfg(*, cfg: MaskGeneratorCfg, **kwargs: Any) -> MaskGenerator:
    return cfg.builder(cfg=cfg, **kwargs)


def register_mask_generator(
    name: Any,
    builder: Optional[Callable[..., MaskGenerator]] = None,
    *,
    doc: str = "",
    requires: Sequence[Tuple[str, str]] = (),
    overwrite: bool = False,
    **defaults: Any,
):
    """Register a mask generator: a :class:`MaskGeneratorCfg`, or a builder under ``name`` (usable as a decorator).

    A builder is called as ``builder(weights=..., seed=..., **defaults, **options)`` and returns a
    :class:`MaskGenerator` (anything with ``generate(image) -> (H, W) int region map``). ``weights`` is None
    (the release checkpoint), ``"random"`` or a local path.
    """
    if isinstance(name, MaskGeneratorCfg):
        cfg = name
        return MASK_GENERATORS.register(cfg.name, _build_from_cfg, doc=cfg.doc, requires=cfg.requires,
                                        overwrite=overwrite, cfg=cfg)
    return MASK_GENERATORS.register(name, builder, doc=doc, requires=requires, overwrite=overwrite, **defaults)


def get_mask_generator_cfg(name: str) -> Optional[MaskGeneratorCfg]:
    """The typed configuration of a registered mask generator (None for plain builders)."""
    return MASK_GENERATORS.get(name).defaults.get("cfg")


def create_mask_generator(name: str, weights: Any = None, *, seed: int = 0, **options: Any) -> MaskGenerator:
    """Build a registered mask generator in eval mode with gradients off.

    Args:
        name: one of :func:`list_mask_generators`.
        weights: None (Meta's release checkpoint, from the cache or downloaded once), a local checkpoint file in
            the release layout, or ``"random"`` (seeded random weights of the real architecture, for tests).
        seed: seed of ``"random"`` weights.
        **options: the family's options: automatic-mask-generation settings (``points_per_side``,
            ``pred_iou_thresh``, ...) and ``model_kwargs`` (architecture overrides, e.g. a small config for tests).
    """
    gen = MASK_GENERATORS.create(name, weights=weights, seed=seed, **options)
    if not callable(getattr(gen, "generate", None)):
        raise InvalidTypeError(f"mask generator '{name}' builder returned {type(gen).__name__} without generate()")
    if isinstance(gen, nn.Module):
        gen = gen.eval().requires_grad_(False)
    return gen


def list_mask_generators(pattern: str = "*") -> List[str]:
    """Names of the registered mask generators."""
    return MASK_GENERATORS.names(pattern)


def describe_mask_generators() -> Dict[str, str]:
    return MASK_GENERATORS.describe()


def check_settings(owner: str, settings: Mapping[str, Any], target: Callable, *, exclude: Iterable[str] = ("model",)
                   ) -> Dict[str, Any]:
    """Keep ``settings`` only if ``target``'s signature names every key (``**kwargs`` catch-alls do not count),
    so that a misspelt setting is an error rather than silently ignored."""
    exclude = set(exclude)
    names = [p.name for p in inspect.signature(target).parameters.values()
             if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in exclude and p.name != "self"]
    for key in settings:
        if key not in names:
            raise InvalidInputError(f"{owner} has no setting '{key}';{suggest(key, names)} its settings: "
                                    f"{', '.join(names)}")
    return dict(settings)
