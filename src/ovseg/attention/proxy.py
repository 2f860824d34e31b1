"""ProxyCLIP proxy attention (Lan et al., ECCV 2024, Eqs. 6-8; docs/methods.md, "Proxy attention").

The attention comes from a vision foundation model's patch features X (B, C, I, J):
``S = X̂ᵀ X̂`` (cosine similarity, Eq. 6), ``A = γ (S − β·mean(S))`` (Eq. 7), entries ``A < 0`` masked to −inf,
``softmax`` over keys (Eq. 8), applied to CLIP's last-block values resized bilinearly to the VFM grid.
The same matrix serves every head. Defaults β = 1.2, γ = 3.0.

Differences from the reference, both documented options:
- the mean is taken per window (per batch item); the reference takes it over the whole batch tensor,
  identical for its batch size of one;
- ``keep_diagonal=True`` never masks a token's similarity with itself, so a nearly uniform window gives
  a finite row instead of NaN. Every row that the reference leaves finite is unchanged, since
  ``S_ii = 1 ≥ S_ij``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError

__all__ = ["proxy_weights", "proxy_attention", "resize_values"]


def proxy_weights(
    feats: torch.Tensor,
    *,
    beta: float = 1.2,
    gamma: float = 3.0,
    keep_diagonal: bool = True,
) -> torch.Tensor:
    """Proxy attention matrix from VFM features (B, C, I, J) -> (B, M, M), M = I·J (row-major).

    Rows sum to 1 (a fully masked row is NaN only when ``keep_diagonal=False``, as in the reference).
    """
    if feats.dim() != 4:
        raise InvalidInputError(f"VFM features must be (B, C, I, J), got shape {tuple(feats.shape)}")
    x = F.normalize(feats.flatten(2), dim=1)  # (B, C, M)
    sim = x.transpose(1, 2) @ x  # (B, M, M), Eq. 6
    mu = sim.mean(dim=(1, 2), keepdim=True)  # per window
    logits = gamma * (sim - beta * mu)  # Eq. 7
    mask = logits < 0
    if keep_diagonal:
        mask.diagonal(dim1=1, dim2=2).fill_(False)
    logits = logits.masked_fill(mask, float("-inf"))
    return torch.softmax(logits, dim=-1)  # Eq. 8


def resize_values(v: torch.Tensor, grid: Tuple[int, int], size: Tuple[int, int]) -> torch.Tensor:
    """Patch values (B, nh, 1+gh·gw, hd) (CLS first, dropped) -> (B, nh, I·J, hd), bilinear, align_corners False."""
    b, nh, _, hd = v.shape
    gh, gw = grid
    vg = v[:, :, 1:].reshape(b * nh, gh, gw, hd).permute(0, 3, 1, 2)  # (B·nh, hd, gh, gw)
    if (gh, gw) != tuple(size):
        vg = F.interpolate(vg, size=tuple(size), mode="bilinear", align_corners=False)
    return vg.flatten(2).transpose(1, 2).reshape(b, nh, size[0] * size[1], hd)


def proxy_attention(
    q: Optional[torch.Tensor],
    k: Optional[torch.Tensor],
    v: torch.Tensor,
    *,
    grid: Tuple[int, int],
    vfm_feats: torch.Tensor,
    beta: float = 1.2,
    gamma: float = 3.0,
    keep_diagonal: bool = True,
    **_: object,
) -> torch.Tensor:
    """ProxyCLIP Eqs. 6-8 applied to CLIP values: (B, nh, 1+gh·gw, hd) -> (B, nh, I·J, hd), no CLS token."""
    if vfm_feats is None:
        raise InvalidInputError("the 'proxy' attention needs VFM features; build the method with a vfm")
    if vfm_feats.shape[0] != v.shape[0]:
        raise InvalidInputError(f"batch mismatch: {vfm_feats.shape[0]} VFM maps for {v.shape[0]} crops")
    size = tuple(vfm_feats.shape[-2:])
    attn = proxy_weights(vfm_feats, beta=beta, gamma=gamma, keep_diagonal=keep_diagonal).to(v.dtype)
    vg = resize_values(v, grid, size)  # (B, nh, M, hd)
    b, nh, m, hd = vg.shape
    # the same matrix mixes every head: one (M, M) @ (M, nh·hd) product instead of broadcasting it over heads
    out = attn @ vg.permute(0, 2, 1, 3).reshape(b, m, nh * hd)  # (B, M, nh·hd)
    return out.view(b, m, nh, hd).permute(0, 2, 1, 3)
