"""Positional-embedding resizing used by CLIP, SCLIP, NACLIP, ProxyCLIP and DINO v1 (METHODS_SPEC.md §2.2, §7 B6).

Bicubic (Keys, A = −0.75), align_corners False, driven by a *scale factor* ``(g + 0.1) / g0`` rather than a
target size, so the sampling positions are ``(dst + 0.5) · g0 / (g + 0.1) − 0.5``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["interpolate_pos_embed"]


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
