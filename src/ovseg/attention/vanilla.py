"""Vanilla q-k attention (CLIP's own last block) and MaskCLIP's value-only attention.

Vanilla: ``softmax(q kᵀ / sqrt(d)) v`` (Vaswani et al. 2017, Eq. 1).
MaskCLIP (Zhou et al., ECCV 2022, §3.2): the attention matrix is replaced by the identity, so every token
keeps its own value embedding, ``out = v``.
All tensors are per head: (B, nh, L, hd).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["vanilla_weights", "vanilla_attention", "maskclip_weights", "maskclip_attention"]


def vanilla_weights(q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None) -> torch.Tensor:
    """Attention matrix ``softmax(q kᵀ · scale)`` of shape (B, nh, L, L); rows sum to 1."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)


def vanilla_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None, **_: object
) -> torch.Tensor:
    """``softmax(q kᵀ · scale) v`` via fused ``F.scaled_dot_product_attention``. (B, nh, L, hd)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def maskclip_weights(num_tokens: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """MaskCLIP's implicit attention matrix: the identity (L, L)."""
    return torch.eye(num_tokens, device=device, dtype=dtype)


def maskclip_attention(q: Optional[torch.Tensor], k: Optional[torch.Tensor], v: torch.Tensor,
                       **_: object) -> torch.Tensor:
    """MaskCLIP: each token's output is its own value vector (identity attention). (B, nh, L, hd)."""
    return v
