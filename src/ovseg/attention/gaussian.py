"""NACLIP neighbourhood attention (Hajimiri et al., WACV 2025, Eqs. 12-15; docs/methods.md, "Gaussian window").

``softmax(k kᵀ / sqrt(d) + Ω) v`` where Ω is an *unnormalised* Gaussian window over the patch grid,
``Ω[(i,j),(k,l)] = exp(-((i-k)² + (j-l)²) / (2σ²))`` (σ = 5 by default), with zeros on the CLS row and
column. Ω is the same for every head. Tensors are per head: (B, nh, L, hd), L = 1 + gh·gw.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError

__all__ = ["gaussian_window", "gaussian_kk_weights", "gaussian_kk_attention"]

_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_CACHE_SIZE = 16


def gaussian_window(
    grid: Tuple[int, int],
    sigma: float = 5.0,
    *,
    with_cls: bool = True,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive Gaussian bias Ω of shape (1+N, 1+N) (or (N, N) without CLS), N = gh·gw, row-major patches.

    Built in float32 and cached per (grid, sigma, device, dtype) in a small LRU (at most 16 entries).
    """
    gh, gw = int(grid[0]), int(grid[1])
    if gh <= 0 or gw <= 0:
        raise InvalidInputError(f"grid must be positive, got {grid}")
    if not sigma > 0:
        raise InvalidInputError(f"sigma must be > 0, got {sigma}")
    key = (gh, gw, float(sigma), bool(with_cls), str(device), dtype)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    ii, jj = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32),
                            indexing="ij")
    pos = torch.stack([ii.flatten(), jj.flatten()], dim=1)  # (N, 2)
    d2 = torch.cdist(pos, pos).pow(2)  # (N, N) squared distances (exact for small integers)
    omega = torch.exp(-d2 / (2.0 * sigma**2))
    if with_cls:
        omega = F.pad(omega, (1, 0, 1, 0))  # zero CLS row and column
    omega = omega.to(device=device, dtype=dtype)
    _CACHE[key] = omega
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return omega


def gaussian_kk_weights(k: torch.Tensor, *, grid: Tuple[int, int], sigma: float = 5.0,
                        scale: Optional[float] = None) -> torch.Tensor:
    """``softmax(k kᵀ · scale + Ω)``, (B, nh, L, L); rows sum to 1."""
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    omega = gaussian_window(grid, sigma, device=k.device, dtype=k.dtype)
    return torch.softmax((k * scale) @ k.transpose(-2, -1) + omega, dim=-1)


def gaussian_kk_attention(
    q: Optional[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: Tuple[int, int],
    sigma: float = 5.0,
    scale: Optional[float] = None,
    **_: object,
) -> torch.Tensor:
    """NACLIP Eq. 15: ``softmax(k kᵀ · scale + Ω) v`` via fused attention with an additive mask."""
    if k.shape[-2] != 1 + grid[0] * grid[1]:
        raise InvalidInputError(f"gaussian_kk expects 1 + {grid[0]}x{grid[1]} tokens, got {k.shape[-2]}")
    omega = gaussian_window(grid, sigma, device=k.device, dtype=k.dtype)
    return F.scaled_dot_product_attention(k, k, v, attn_mask=omega, scale=scale)
