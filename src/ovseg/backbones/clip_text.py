"""open_clip's text tower run only on the tokens that decide the result — exact, and several times faster.

CLIP's text transformer is causal (each position attends to itself and the positions before it) with absolute
positional embeddings, and the text embedding is read at one position (the end-of-text token, "EOT"). Hence:

* the hidden state of position ``p`` depends only on the tokens ``0..p``: a prompt padded to 77 tokens can stop at
  its EOT position (``"truncate"``: each batch runs to its longest EOT, positional embedding and causal mask
  sliced);
* prompts that begin with the same tokens share those positions' hidden states. ``"shared_prefix"`` computes every
  distinct prefix once (the nodes of the prompts' token trie: the start token for all prompts, the template's
  words before the label for all labels) and lets each token attend to its own prefix.

Both equal open_clip's ``encode_text`` up to float32 rounding (different summation orders, see
``tests/models/test_clip_text.py``). Towers where this does not hold — bidirectional (no causal mask), a class
token, ``'last'`` pooling, Hugging Face text models — run open_clip's ``encode_text`` unchanged (``"full"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TEXT_MODES", "text_forward_mode", "encode_text"]

TEXT_MODES = ("shared_prefix", "truncate", "full")

_ROWS_PER_BATCH = 256  # rows per forward pass in the "truncate" and "full" modes


@dataclass
class _Tower:
    """The modules of an open_clip causal text tower (from ``CLIP`` itself or a ``CustomTextCLIP.text``)."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor  # (context, D)
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: Any  # (D, E) parameter, nn.Linear or None
    pool_type: str
    eos_id: Optional[int]
    attn_mask: Optional[torch.Tensor]  # (context, context) additive


def _is_causal_mask(mask: Optional[torch.Tensor]) -> bool:
    """True for open_clip's additive causal mask: 0 on and below the diagonal, -inf above."""
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1] or not mask.is_floating_point():
        return False
    upper = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu_(1)
    return bool(torch.isneginf(mask[upper]).all()) and bool((mask[~upper] == 0).all())


def _find_tower(model: nn.Module) -> Tuple[Optional[_Tower], str]:
    """(the causal text tower, "") when truncation is exact for ``model.encode_text``, else (None, why not)."""
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.transformer import TextTransformer

    if model.training:
        return None, "the model is in training mode"
    if isinstance(model, CLIP) and type(model).encode_text is CLIP.encode_text:
        tower = _Tower(model.token_embedding, model.positional_embedding, model.transformer, model.ln_final,
                       model.text_projection, model.text_pool_type, getattr(model, "text_eos_id", None),
                       model.attn_mask)
    elif isinstance(model, CustomTextCLIP) and type(model).encode_text is CustomTextCLIP.encode_text:
        text = model.text
        if type(text) is not TextTransformer:
            return None, f"the text tower is a {type(text).__name__}, not open_clip's TextTransformer"
        if text.cls_emb is not None:
            return None, "the text tower appends a class token"
        if text.output_tokens or text.use_pad_mask:
            return None, "the text tower returns tokens or masks padding"
        tower = _Tower(text.token_embedding, text.positional_embedding, text.transformer, text.ln_final,
                       text.text_projection, text.pool_type, text.eos_id, text.attn_mask)
    else:
        return None, f"{type(model).__name__} is not open_clip's CLIP or CustomTextCLIP"
    if not _is_causal_mask(tower.attn_mask):
        return None, "the text tower is not causal"
    if tower.pool_type not in ("argmax", "eos") or (tower.pool_type == "eos" and tower.eos_id is None):
        return None, f"text pooling '{tower.pool_type}' does not read one end-of-text position"
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    if not all(type(b) in (ResidualAttentionBlock, CustomResidualAttentionBlock) for b in tower.transformer.resblocks):
        return None, "the text tower has blocks of an unknown type"
    return tower, ""


def _plain_blocks(tower: _Tower) -> bool:
    """Every block is open_clip's standard pre-LN block around torch's MultiheadAttention (shared_prefix can run
    it on a token trie)."""
    from open_clip.transformer import ResidualAttentionBlock

    for b in tower.transformer.resblocks:
        a = b.attn
        if (type(b) is not ResidualAttentionBlock or hasattr(b, "ln_1_kv") or not isinstance(a, nn.MultiheadAttention)
                or not a._qkv_same_embed_dim or a.in_proj_weight is None or a.bias_k is not None or a.add_zero_attn):
            return False
    return True


def text_forward_mode(model: nn.Module) -> str:
    """How :func:`encode_text` runs ``model``'s text tower: ``"shared_prefix"`` (causal tower of standard blocks),
    ``"truncate"`` (causal tower with custom blocks) or ``"full"`` (open_clip's ``encode_text`` unchanged)."""
    tower, _ = _find_tower(model)
    if tower is None:
        return "full"
    return "shared_prefix" if _plain_blocks(tower) else "truncate"


def _pooled_positions(tower: _Tower, tokens: torch.Tensor) -> torch.Tensor:
    """(N,) the position each prompt's embedding is read at, exactly as open_clip's ``text_global_pool``."""
    if tower.pool_type == "argmax":
        return tokens.argmax(dim=-1)
    return (tokens == tower.eos_id).int().argmax(dim=-1)


def _finish(tower: _Tower, x: torch.Tensor) -> torch.Tensor:
    """Pooled hidden states (N, D) -> ``ln_final`` then the text projection (N, E). LayerNorm is per token, so
    normalising after pooling equals open_clip's normalise-then-pool."""
    x = tower.ln_final(x)
    proj = tower.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def _encode_truncated(tower: _Tower, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """open_clip's blocks on ``tokens[:, :L]`` (L = the batch's longest EOT + 1), prompts sorted by length so that
    short prompts do not run as long as the longest one. tokens: (N, C) -> (N, E)."""
    cast = tower.transformer.get_cast_dtype()
    order = torch.argsort(pos)
    out: List[torch.Tensor] = []
    for i in range(0, len(order), _ROWS_PER_BATCH):
        rows = order[i:i + _ROWS_PER_BATCH]
        p = pos[rows]
        n = int(p.max()) + 1
        x = tower.token_embedding(tokens[rows, :n]).to(cast)  # (B, L, D)
        x = x + tower.positional_embedding[:n].to(cast)
        x = tower.transformer(x, attn_mask=tower.attn_mask[:n, :n])
        out.append(_finish(tower, x[torch.arange(len(rows), device=x.device), p]))
    y = torch.cat(out)
    return y[torch.argsort(order)]


@dataclass
class _Trie:
    """The distinct prefixes of a batch of prompts, level by level.

    Node ids are grouped by depth: the nodes at depth ``d`` are ``start[d] .. start[d+1]-1`` and ``ancestors[d]``
    (m_d, d+1) lists, for each of them, the nodes of its prefix at depths 0..d (itself last).
    """

    token: torch.Tensor  # (M,) token id of each node
    position: torch.Tensor  # (M,) its depth = position in the prompt
    start: List[int]  # len depth + 1
    ancestors: List[torch.Tensor]
    leaf: torch.Tensor  # (N,) the node each prompt's embedding is read at


def _build_trie(tokens: torch.Tensor, pos: torch.Tensor) -> _Trie:
    """Token trie of the prompts' first ``pos + 1`` tokens (vectorised per depth). tokens: (N, C) int64 on CPU."""
    n = tokens.shape[0]
    length = pos + 1
    vocab = int(tokens.max()) + 1
    node_of_row = torch.full((n,), -1, dtype=torch.long)  # the node of each row's prefix so far
    tok_parts, start, ancestors = [], [0], []
    prev_anc, prev_start = None, 0
    for d in range(int(length.max())):
        rows = (length > d).nonzero().squeeze(1)
        key = (node_of_row[rows] + 1) * vocab + tokens[rows, d]  # (parent, token) -> one integer
        uniq, inv = torch.unique(key, return_inverse=True)
        m = uniq.numel()
        ids = torch.arange(start[-1], start[-1] + m)
        node_of_row[rows] = start[-1] + inv
        if d == 0:
            anc = ids.view(m, 1)
        else:
            parent = uniq // vocab - 1
            anc = torch.cat([prev_anc[parent - prev_start], ids.view(m, 1)], dim=1)
        tok_parts.append(uniq % vocab)
        ancestors.append(anc)
        prev_anc, prev_start = anc, start[-1]
        start.append(start[-1] + m)
    token = torch.cat(tok_parts)
    position = torch.cat([torch.full((start[d + 1] - start[d],), d, dtype=torch.long) for d in range(len(ancestors))])
    return _Trie(token, position, start, ancestors, node_of_row)


def _trie_block(blk: nn.Module, x: torch.Tensor, trie: _Trie) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock`` (pre-LN) on trie nodes: every node attends to its own prefix, which
    is exactly the causal attention row of its position. x: (M, D) -> (M, D)."""
    attn = blk.attn
    d = x.shape[-1]
    nh = attn.num_heads
    hd = d // nh
    qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (M, 3D)
    q, k, v = qkv.split(d, dim=-1)
    mixed = torch.empty_like(q)  # (M, D)
    for depth, anc in enumerate(trie.ancestors):
        s, e = trie.start[depth], trie.start[depth + 1]
        m = e - s
        qd = q[s:e].reshape(m, 1, nh, hd).transpose(1, 2)  # (m, nh, 1, hd)
        kd = k[anc].view(m, depth + 1, nh, hd).transpose(1, 2)  # (m, nh, depth+1, hd): the node's prefix
        vd = v[anc].view(m, depth + 1, nh, hd).transpose(1, 2)
        mixed[s:e] = F.scaled_dot_product_attention(qd, kd, vd).transpose(1, 2).reshape(m, d)
    x = x + blk.ls_1(F.linear(mixed, attn.out_proj.weight, attn.out_proj.bias))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def _encode_shared_prefix(tower: _Tower, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Every distinct prefix once. tokens: (N, C) -> (N, E)."""
    device = tower.positional_embedding.device
    trie = _build_trie(tokens.cpu(), pos.cpu())
    cast = tower.transformer.get_cast_dtype()
    node_tok = trie.token.to(device)
    trie.ancestors = [a.to(device) for a in trie.ancestors]
    x = tower.token_embedding(node_tok).to(cast) + tower.positional_embedding[trie.position.to(device)].to(cast)
    for blk in tower.transformer.resblocks:  # (M, D)
        x = _trie_block(blk, x, trie)
    return _finish(tower, x[trie.leaf.to(device)])


def encode_text(model: nn.Module, tokens: torch.Tensor, *, mode: Optional[str] = None) -> torch.Tensor:
    """Text embeddings of open_clip ``model`` (not normalised), equal to ``model.encode_text(tokens)`` up to float32
    rounding.

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` (any other model runs its own ``encode_text``).
        tokens: (N, context) int64 token ids from the model's tokenizer.
        mode: ``None`` picks the fastest exact mode (:func:`text_forward_mode`); ``"truncate"`` or ``"full"`` force
            a slower one (``"shared_prefix"`` needs standard blocks). A mode that is not exact for this model is
            refused.

    Returns:
        (N, E) in the text tower's dtype.
    """
    best = text_forward_mode(model)
    mode = best if mode is None else mode
    if mode not in TEXT_MODES:
        from ..errors import InvalidInputError

        raise InvalidInputError(f"text mode must be one of {TEXT_MODES}, got {mode!r}")
    if TEXT_MODES.index(mode) < TEXT_MODES.index(best):
        from ..errors import InvalidInputError

        raise InvalidInputError(f"text mode {mode!r} is not exact for this model; it supports {best!r} "
                                f"({_find_tower(model)[1] or 'custom blocks'})")
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        from ..errors import InvalidInputError

        raise InvalidInputError(f"tokens must be a non-empty (N, context) tensor, got shape {tuple(tokens.shape)}")
    if mode == "full":
        return torch.cat([model.encode_text(tokens[i:i + _ROWS_PER_BATCH])
                          for i in range(0, tokens.shape[0], _ROWS_PER_BATCH)])
    tower, _ = _find_tower(model)
    if tokens.shape[1] > tower.positional_embedding.shape[0]:
        from ..errors import InvalidInputError

        raise InvalidInputError(f"tokens have {tokens.shape[1]} positions, the text tower has "
                                f"{tower.positional_embedding.shape[0]}")
    pos = _pooled_positions(tower, tokens)
    if mode == "truncate":
        return _encode_truncated(tower, tokens, pos)
    return _encode_shared_prefix(tower, tokens, pos)
