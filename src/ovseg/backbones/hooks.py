"""Layer hooks: collect intermediate outputs of a transformer in the same forward that computes its features.

A :class:`Collect` names the blocks whose outputs (``tokens``), per-head projections (``qkv``) or post-softmax
attention weights (``attn``) a strategy needs; the backbone's ``forward_intermediates`` returns them in an
:class:`Intermediates`, so nothing runs twice. Blocks are indexed from 0 (Python-style negative indices count from
the end). Attention weights are only materialised for the blocks that ask for them; every other block keeps the
fused attention path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError

__all__ = ["Collect", "Intermediates", "timm_block_forward", "timm_block_qkv", "attention_weights"]

QKV = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Collect:
    """Which intermediates to keep from one forward.

    Attributes:
        tokens: block indices whose output tokens to keep, (B, T, D) with the prefix tokens (CLS, registers).
        qkv: block indices whose per-head q, k, v to keep, each (B, nh, T, hd), computed from the block's
            normalised input (the projection output *with* its bias).
        attn: block indices whose post-softmax attention weights to keep, (B, nh, T, T).
        embed: keep the input of block 0 (the embedded tokens after the positional embedding and any pre-norm).
        stop: end the forward at the last block named above: later blocks and the final norm do not run, and of
            that block only what is collected is computed (its q/k/v need only its norm and qkv projection);
            ``Intermediates.x`` is then that block's *input*. Honoured by the timm VFMs; CLIP's trunk always
            stops before its last block anyway.
    """

    tokens: Tuple[int, ...] = ()
    qkv: Tuple[int, ...] = ()
    attn: Tuple[int, ...] = ()
    embed: bool = False
    stop: bool = False

    def __bool__(self) -> bool:
        return bool(self.tokens or self.qkv or self.attn or self.embed)

    def union(self, other: Optional["Collect"]) -> "Collect":
        if not other:
            return self
        return Collect(tuple(sorted(set(self.tokens) | set(other.tokens))),
                       tuple(sorted(set(self.qkv) | set(other.qkv))),
                       tuple(sorted(set(self.attn) | set(other.attn))), self.embed or other.embed,
                       self.stop or other.stop)

    def resolved(self, num_blocks: int, *, limit: Optional[int] = None, owner: str = "backbone") -> "Collect":
        """Indices made non-negative and checked against ``[0, limit)`` (``limit`` defaults to ``num_blocks``)."""
        limit = num_blocks if limit is None else limit

        def fix(kind: str, idx: Iterable[int]) -> Tuple[int, ...]:
            out = []
            for i in idx:
                j = int(i) + num_blocks if int(i) < 0 else int(i)
                if not 0 <= j < limit:
                    raise InvalidInputError(
                        f"{owner}: cannot collect {kind} of block {i}: blocks 0..{limit - 1} are available "
                        f"(the model has {num_blocks} blocks" + (", the last one belongs to the strategy)"
                                                                 if limit < num_blocks else ")"))
                out.append(j)
            return tuple(sorted(set(out)))

        return Collect(fix("tokens", self.tokens), fix("qkv", self.qkv), fix("attn", self.attn), self.embed,
                       self.stop)

    @property
    def last(self) -> Optional[int]:
        """The highest block index named (None if none); resolve first for negative indices."""
        idx = self.tokens + self.qkv + self.attn
        return max(idx) if idx else None


@dataclass
class Intermediates:
    """What a ``forward_intermediates`` call returns.

    Attributes:
        x: the final tokens of the pass: for CLIP the input of the last block (B, 1+N, D); for a VFM its output
            after the final norm (B, T, C).
        grid: the patch grid (gh, gw).
        tokens, qkv, attn: the collected intermediates by block index (see :class:`Collect`).
        embed: the input of block 0 when ``Collect(embed=True)``.
    """

    x: torch.Tensor
    grid: Tuple[int, int]
    embed: Optional[torch.Tensor] = None
    tokens: Dict[int, torch.Tensor] = field(default_factory=dict)
    qkv: Dict[int, QKV] = field(default_factory=dict)
    attn: Dict[int, torch.Tensor] = field(default_factory=dict)


def attention_weights(q: torch.Tensor, k: torch.Tensor, scale: float,
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax(q kᵀ · scale [+ mask])`` over keys: (B, nh, Tq, hd), (B, nh, Tk, hd) -> (B, nh, Tq, Tk).

    A boolean ``mask`` is True where attention is allowed (as in ``F.scaled_dot_product_attention``).
    """
    logits = (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return torch.softmax(logits, dim=-1)


def timm_block_qkv(blk, x: torch.Tensor) -> QKV:
    """Per-head q, k, v (B, nh, T, hd) of a timm ``vision_transformer.Block`` on its input x (B, T, C): ``norm1``,
    the fused qkv projection and the q/k norms, nothing else of the block."""
    attn = blk.attn
    b, t, _ = x.shape
    q, k, v = attn.qkv(blk.norm1(x)).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def timm_block_forward(blk, x: torch.Tensor, *, want_qkv: bool = False,
                       want_attn: bool = False) -> Tuple[torch.Tensor, Optional[QKV], Optional[torch.Tensor]]:
    """A timm ``vision_transformer.Block`` (pre-norm, ``Attention`` with fused qkv) on (B, T, C), returning its
    output and, when asked, the per-head q, k, v (after q/k norms) and the attention weights.

    Equal to ``blk(x)`` in eval mode (dropout and drop-path are identities).
    """
    attn = blk.attn
    b, t, _ = x.shape
    nh, hd = attn.num_heads, attn.head_dim
    y = blk.norm1(x)
    gate = attn.gate(y).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(y).reshape(b, t, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = None
    if want_attn:
        weights = attention_weights(q, k, attn.scale)
        o = weights @ v
    else:
        o = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    o = attn.norm(o.transpose(1, 2).reshape(b, t, nh * hd))
    if gate is not None:
        o = o * gate
    x = x + blk.ls1(attn.proj(o))
    x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return x, ((q, k, v) if want_qkv else None), weights
