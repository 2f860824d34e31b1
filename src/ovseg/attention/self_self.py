"""Self-self attention: q-q (ClearCLIP), k-k, and SCLIP's correlative self-attention q-q + k-k.

- ClearCLIP (Lan et al., ECCV 2024, Eq. 5): ``softmax(q qᵀ / sqrt(d)) v``.
- k-k (NACLIP's ablation): ``softmax(k kᵀ / sqrt(d)) v``.
- SCLIP (Wang et al., ECCV 2024, Eq. 5; NACLIP's ``csa``):
  ``(softmax(q qᵀ s) + softmax(k kᵀ s)) v`` — two row-stochastic matrices summed, so rows sum to 2.
All tensors are per head: (B, nh, L, hd).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "self_weights", "qq_attention", "kk_attention", "qq_kk_weights", "qq_kk_attention",
]


def self_weights(x: torch.Tensor, *, scale: Optional[float] = None) -> torch.Tensor:
    """``softmax(x xᵀ · scale)``, (B, nh, L, L); x is q for q-q or k for k-k. Symmetric logits."""
    scale = x.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax((x * scale) @ x.transpose(-2, -1), dim=-1)


def qq_attention(q: torch.Tensor, k: Optional[torch.Tensor], v: torch.Tensor, *, scale: Optional[float] = None,
                 **_: object) -> torch.Tensor:
    """ClearCLIP: ``softmax(q qᵀ · scale) v``."""
    return F.scaled_dot_product_attention(q, q, v, scale=scale)


def kk_attention(q: Optional[torch.Tensor], k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                 **_: object) -> torch.Tensor:
    """k-k: ``softmax(k kᵀ · scale) v``."""
    return F.scaled_dot_product_attention(k, k, v, scale=scale)


def qq_kk_weights(q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None) -> torch.Tensor:
    """SCLIP: ``softmax(q qᵀ s) + softmax(k kᵀ s)``, rows sum to 2 (no renormalisation)."""
    return self_weights(q, scale=scale) + self_weights(k, scale=scale)


def qq_kk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                    **_: object) -> torch.Tensor:
    """SCLIP: ``(softmax(q qᵀ s) + softmax(k kᵀ s)) v``, as two fused attentions (linear in the weights)."""
    return F.scaled_dot_product_attention(q, q, v, scale=scale) + F.scaled_dot_product_attention(k, k, v, scale=scale)
