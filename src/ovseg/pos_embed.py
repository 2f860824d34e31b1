"""Positional-embedding resizing used by CLIP, SCLIP, NACLIP, ProxyCLIP and DINO v1
(docs/methods.md, "Positional embeddings").

Bicubic (Keys, A = −0.75), align_corners False, driven by a *scale factor* ``(g + 0.1) / g0`` rather than a
target size, so the sampling positions are ``(dst + 0.5) · g0 / (g + 0.1) − 0.5``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .errors import InvalidInputError

__all__ = ["interpolate_pos_embed", "resize_pos_embed"]


def interpolate_pos_embed(pos: torch.Tensor, base_grid: Tuple[int, int], grid: Tuple[int, int]) -> torch.Tensor:
    """Resize patch position embeddings (g0h·g0w, D) to (gh·gw, D), computed in float32.

    Returns ``pos`` itself when the grid is unchanged. (The references also skip the resize for a non-square
    grid with the same token count, which silently misplaces positions; ovseg resizes it.)
    """
    g0h, g0w = base_grid
    gh, gw = grid
    if (gh, gw) == (g0h, g0w):
        return pos
    d = pos.shape[-1]
    x = pos.reshape(1, g0h, g0w, d).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, scale_factor=((gh + 0.1) / g0h, (gw + 0.1) / g0w), mode="bicubic", align_corners=False)
    if tuple(x.shape[-2:]) != (gh, gw):  # pragma: no cover - guarded by the +0.1 offset
        raise RuntimeError(f"positional embedding resize gave {tuple(x.shape[-2:])}, expected {(gh, gw)}")
    return x.permute(0, 2, 3, 1).reshape(gh * gw, d).to(pos.dtype)


def resize_pos_embed(
    pos: torch.Tensor, base_grid: Tuple[int, int], grid: Tuple[int, int], mode: str = "legacy"
) -> torch.Tensor:
    """Resize patch position embeddings (g0h·g0w, D) -> (gh·gw, D) with one of the references' rules, in fp32.

    - ``legacy``: :func:`interpolate_pos_embed` (CLIP, DINO v1, DINOv2 without registers);
    - ``antialias``: bicubic with antialiasing to the target size (DINOv2 with registers, hub code after
      2024-02: PIL-style kernel a = −0.5, support widened when downsampling);
    - ``size``: plain bicubic (A = −0.75) to the target size, align_corners False (MAE's load-time resize).
    """
    if mode == "legacy":
        return interpolate_pos_embed(pos, base_grid, grid)
    if mode not in ("antialias", "size"):
        raise InvalidInputError(f"unknown positional resize mode {mode!r}; use 'legacy', 'antialias' or 'size'")
    if tuple(grid) == tuple(base_grid):
        return pos
    d = pos.shape[-1]
    x = pos.reshape(1, base_grid[0], base_grid[1], d).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=tuple(grid), mode="bicubic", align_corners=False, antialias=(mode == "antialias"))
    return x.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], d).to(pos.dtype)
