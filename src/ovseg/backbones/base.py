"""The VFM interface and registry: any backbone returning dense features (B, C, h, w) can guide ProxyCLIP."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._registry import Registry
from ..config import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["VFM", "VFMS", "register_vfm", "create_vfm", "list_vfms"]


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


VFMS = Registry("vfm", "list_vfms")


def register_vfm(
    name: str,
    builder: Optional[Callable[..., nn.Module]] = None,
    *,
    doc: str = "",
    requires: Sequence[Tuple[str, str]] = (),
    overwrite: bool = False,
    **defaults: Any,
):
    """Register a VFM builder under ``name`` (usable as a decorator).

    The builder is called as ``builder(weights=..., seed=..., **defaults)`` and must return an ``nn.Module``
    with ``mean``, ``std``, ``patch_size``, ``embed_dim`` attributes and ``forward_features(x) -> (B, C, h, w)``
    (subclassing :class:`VFM` gives sensible defaults). ``weights`` is None (the official weights), ``"random"``,
    or a local path.
    """
    return VFMS.register(name, builder, doc=doc, requires=requires, overwrite=overwrite, **defaults)


def create_vfm(name: str, weights: Any = None, *, seed: int = 0, **overrides: Any) -> nn.Module:
    """Build a registered VFM in eval mode with gradients off."""
    model = VFMS.create(name, weights=weights, seed=seed, **overrides)
    for attr in ("mean", "std", "patch_size", "embed_dim", "forward_features"):
        if not hasattr(model, attr):
            raise TypeError(f"VFM '{name}' builder returned {type(model).__name__} without '{attr}'")
    return model.eval().requires_grad_(False)


def list_vfms(pattern: str = "*") -> List[str]:
    """Names of the registered VFMs."""
    return VFMS.names(pattern)


def describe_vfms() -> Dict[str, str]:
    return VFMS.describe()
