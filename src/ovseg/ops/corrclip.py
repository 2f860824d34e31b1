"""CorrCLIP (Zhang et al., ICCV 2025, "Reconstructing Patch Correlations in CLIP"): its new operations.

Scope reconstruction (the masked softmax over class-agnostic regions), value reconstruction (DINO ``q + k``
similarity at a temperature applied to CLIP values), the spatial branch (mean of intermediate block outputs),
the semantic branch (one region class token per region, attending only to its region), the final fusion, the
class-0 synonym merge and the per-region majority vote, each as a stateless function that follows the
official v1 code (docs/methods.md, "CorrCLIP").

Conventions: ``B`` windows (or images), a VFM grid ``(I, J)`` of ``M = I·J`` cells, a CLIP grid ``(gh, gw)`` of
``N = gh·gw`` patches with the CLS token first, width ``D``, ``nh`` heads of width ``hd``. A *region map* is an
integer tensor in which equal values form one region and the **smallest value** in a window (or image) plays
"unsegmented" (``U``); a padded border carries the value 10000 and is an ordinary region.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention.proxy import resize_values
from ..errors import InvalidInputError, InvalidTypeError

__all__ = [
    "PAD_REGION", "MERGED_REGION_OFFSET",
    "resize_region_map", "pad_region_map", "paint_masks",
    "connected_components", "merge_regions",
    "vfm_qk_features", "scope_allow", "scope_attention",
    "spatial_block_indices", "mean_block_outputs",
    "correlation_branch",
    "region_token_allow", "region_token_block", "region_tokens", "scatter_region_tokens",
    "fuse_branches", "merge_first_class_synonyms", "region_vote",
]

PAD_REGION = 10000  # region id given to the padding of a window (the reference's pad value)
MERGED_REGION_OFFSET = 10000  # merged regions are renumbered offset + cluster index

_EXACT_FLOAT_IDS = 1 << 24  # region ids go through float32 in nearest resizing: exact up to 2**24


def _check_region_map(regions: torch.Tensor, name: str = "regions") -> None:
    if not isinstance(regions, torch.Tensor):
        raise InvalidTypeError(f"{name} must be an integer torch.Tensor, got {type(regions).__name__}")
    if regions.dtype.is_floating_point or regions.dtype == torch.bool or regions.is_complex():
        raise InvalidTypeError(f"{name} must hold integer region ids, got dtype {regions.dtype}")


# ---------------------------------------------------------------------------------------------- region maps
def resize_region_map(regions: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Nearest resizing of a region map, exactly as the reference (through float32, ``mode='nearest'``).

    Output cell ``(i, j)`` takes input pixel ``(floor(i·H/h), floor(j·W/w))``: one pixel per cell, not a vote.
    Used for the original-size map -> resized image, the window -> VFM grid (``(h//8, w//8)``) and the
    VFM grid -> CLIP grid.

    Args:
        regions: (B, H, W) integer region ids with ``|id| < 2**24``.
        size: target (h, w).

    Returns:
        (B, h, w) region ids, same dtype.
    """
    _check_region_map(regions)
    if regions.dim() != 3:
        raise InvalidInputError(f"regions must be (B, H, W), got shape {tuple(regions.shape)}")
    if regions.numel() and int(regions.abs().max()) >= _EXACT_FLOAT_IDS:
        raise InvalidInputError(f"region ids must be below 2**24 in magnitude to resize exactly, got "
                                f"{int(regions.abs().max())}")
    if tuple(regions.shape[-2:]) == tuple(size):
        return regions
    out = F.interpolate(regions[:, None].float(), size=tuple(size), mode="nearest")  # (B, 1, h, w)
    return out[:, 0].to(regions.dtype)


def pad_region_map(regions: torch.Tensor, pad: Tuple[int, int, int, int], value: int = PAD_REGION) -> torch.Tensor:
    """Pad a window's region map like its image (``pad = (left, right, top, bottom)``) with the region ``value``.

    Args:
        regions: (B, h, w) region ids.
        pad: ``ovseg.sliding.pad_amounts`` of the window.
        value: id of the padding region (the reference: 10000, an ordinary region).

    Returns:
        (B, h + top + bottom, w + left + right) region ids.
    """
    _check_region_map(regions)
    if not any(pad):
        return regions
    return F.pad(regions, tuple(int(p) for p in pad), mode="constant", value=int(value))


def paint_masks(
    masks: torch.Tensor,
    order: Optional[torch.Tensor] = None,
    *,
    ids: str = "rank",
) -> torch.Tensor:
    """Paint binary masks into one region map: later masks overwrite earlier ones, 0 = covered by none.

    The reference's SAM 2 path sorts the masks by ascending area (a stable sort) and paints them with ids
    1..K in that order, so a larger mask overwrites a smaller one where they overlap; its EntitySeg path paints
    in ascending score order but keeps id = original index + 1.

    Args:
        masks: (K, H, W) bool masks.
        order: (K,) sort key, painted in ascending order (stable); None paints in the given order.
            SAM 2: the mask areas; EntitySeg: the scores.
        ids: ``"rank"`` (id = 1 + position in painting order) or ``"index"`` (id = 1 + index in ``masks``).

    Returns:
        (H, W) int64 region map.
    """
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3:
        raise InvalidInputError(f"masks must be a (K, H, W) tensor, got "
                                f"{tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__}")
    if ids not in ("rank", "index"):
        raise InvalidInputError(f"ids must be 'rank' or 'index', got {ids!r}")
    k = masks.shape[0]
    if order is None:
        perm = torch.arange(k, device=masks.device)
    else:
        if order.shape != (k,):
            raise InvalidInputError(f"order must have shape ({k},), got {tuple(order.shape)}")
        perm = torch.sort(order, stable=True).indices
    out = torch.zeros(masks.shape[1:], dtype=torch.int64, device=masks.device)  # (H, W)
    for rank, idx in enumerate(perm.tolist()):  # O(H·W) memory, like the reference's loop
        out[masks[idx].bool()] = (rank if ids == "rank" else idx) + 1
    return out


# ---------------------------------------------------------------------------------------------- region merging
def connected_components(adjacency: torch.Tensor) -> torch.Tensor:
    """Connected components of an undirected graph, numbered 0, 1, ... in the order of their lowest member.

    This is what the reference's ``DBSCAN(eps, min_samples=1, metric='precomputed')`` computes on a
    symmetric distance matrix (every point is a core point; clusters are grown from the lowest unlabelled
    index): the components of the graph "distance ≤ eps". The adjacency is symmetrised, so an asymmetric
    input is read as undirected.

    Args:
        adjacency: (K, K) bool.

    Returns:
        (K,) int64 component labels.
    """
    if adjacency.dim() != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise InvalidInputError(f"adjacency must be square (K, K), got shape {tuple(adjacency.shape)}")
    k = adjacency.shape[0]
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=adjacency.device)
    a = adjacency.bool()
    a = a | a.T | torch.eye(k, dtype=torch.bool, device=a.device)
    big = torch.full((k, k), k, dtype=torch.int64, device=a.device)
    lab = torch.arange(k, device=a.device)
    while True:  # min-label propagation with pointer jumping: converges to each component's lowest index
        new = torch.where(a, lab.view(1, k).expand(k, k), big).amin(dim=1)
        new = new[new]
        if torch.equal(new, lab):
            break
        lab = new
    return torch.unique(lab, return_inverse=True)[1]  # renumber 0.. by lowest member


def merge_regions(
    regions: torch.Tensor,
    feats: torch.Tensor,
    *,
    eps: float = 0.2,
    offset: int = MERGED_REGION_OFFSET,
) -> torch.Tensor:
    """Merge regions whose mean VFM features are close (the reference's DBSCAN step), per window.

    For a window with more than two region ids: the mean feature of each region is L2-normalised, the
    smallest-id region ``U`` is left out, ``G = f fᵀ``, the distance is ``max(G) − G``, and regions in one
    connected component of "distance ≤ eps" get the id ``offset + component`` (components numbered by their
    lowest member in ascending id order). ``U`` keeps its id. Windows with one or two ids are unchanged.

    Args:
        regions: (B, I, J) region ids on the VFM grid.
        feats: (B, I·J, C) VFM features (unit-norm, row-major), the same ones the scope uses.
        eps: merge distance (0.2).
        offset: first id of merged regions (10000).

    Returns:
        (B, I, J) merged region ids, same dtype.
    """
    _check_region_map(regions)
    if regions.dim() != 3 or feats.dim() != 3 or feats.shape[:2] != (regions.shape[0], regions[0].numel()):
        raise InvalidInputError(f"regions (B, I, J) {tuple(regions.shape)} and feats (B, I·J, C) "
                                f"{tuple(feats.shape)} do not match")
    out = regions.clone()
    for b in range(regions.shape[0]):  # the number of regions differs per window
        ids, inv = torch.unique(regions[b].flatten(), return_inverse=True)  # ascending ids
        k = ids.numel()
        if k <= 2:
            continue
        onehot = F.one_hot(inv, k).T.float()  # (K, M)
        mean = (onehot @ feats[b].float()) / onehot.sum(dim=1, keepdim=True)  # (K, C) region means
        f = F.normalize(mean.to(feats.dtype), dim=1)[1:]  # (K-1, C): U left out
        g = f @ f.T  # (K-1, K-1)
        dist = g.max() - g
        lab = connected_components(dist <= eps)  # (K-1,)
        new_ids = torch.cat([ids[:1], (offset + lab).to(ids.dtype)])  # (K,)
        out[b] = new_ids[inv].view(regions.shape[1:])
    return out


# ---------------------------------------------------------------------------------------------- scope + value
def vfm_qk_features(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """DINO's last-block ``q + k`` (raw projections with bias, heads concatenated), CLS dropped, L2-normalised.

    Args:
        q: (B, nh, 1+M, hd) queries of the VFM's last block.
        k: (B, nh, 1+M, hd) keys of the same block.

    Returns:
        (B, M, nh·hd) unit-norm features, row-major over the VFM grid.
    """
    if q.shape != k.shape or q.dim() != 4:
        raise InvalidInputError(f"q and k must both be (B, nh, 1+M, hd), got {tuple(q.shape)} and {tuple(k.shape)}")
    b, nh, n, hd = q.shape
    x = (q + k).transpose(1, 2).reshape(b, n, nh * hd)[:, 1:]  # (B, M, C)
    return F.normalize(x, dim=-1)


def scope_allow(regions: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
    """Which pairs may attend (scope reconstruction): same region, or either in ``U`` and above the mean.

    ``allow[i, j] = (r_i == r_j and r_i ∉ U) or ((i ∈ U or j ∈ U) and S_ij > mean(S))`` where ``U`` is the
    window's smallest id and the mean runs over all M² entries (diagonal included) of the window.

    Args:
        regions: (B, M) region ids (row-major VFM grid), after merging.
        sim: (B, M, M) VFM similarity.

    Returns:
        (B, M, M) bool, True = may attend.
    """
    _check_region_map(regions)
    u = regions == regions.amin(dim=1, keepdim=True)  # (B, M)
    same = (regions[:, :, None] == regions[:, None, :]) & ~u[:, :, None]  # (B, M, M)
    above = sim > sim.mean(dim=(1, 2), keepdim=True)
    return same | ((u[:, :, None] | u[:, None, :]) & above)


def scope_attention(
    feats: torch.Tensor,
    regions: torch.Tensor,
    *,
    temperature: float = 4.0,
    keep_diagonal: bool = False,
) -> torch.Tensor:
    """``softmax_j(τ · S_ij)`` over the allowed pairs (masked softmax), ``S = feats featsᵀ``, τ = 4.

    Args:
        feats: (B, M, C) unit-norm VFM features (:func:`vfm_qk_features`).
        regions: (B, M) or (B, I, J) merged region ids on the VFM grid.
        temperature: τ, multiplies the similarity (the reference's ``TAU = 4``).
        keep_diagonal: also allow ``i -> i`` (only matters for a ``U`` token whose self-similarity is not
            above the window mean, e.g. a uniform window, where the reference's row is NaN).

    Returns:
        (B, M, M) attention, rows sum to 1, the same for every head.
    """
    regions = regions.flatten(1)
    if feats.dim() != 3 or regions.shape != feats.shape[:2]:
        raise InvalidInputError(f"feats (B, M, C) {tuple(feats.shape)} and regions (B, M) {tuple(regions.shape)} "
                                "do not match")
    sim = feats @ feats.transpose(1, 2)  # (B, M, M)
    allow = scope_allow(regions, sim)
    if keep_diagonal:
        allow = allow | torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
    logits = (sim * temperature).masked_fill(~allow, float("-inf"))
    return torch.softmax(logits, dim=-1)


def correlation_branch(
    attn: torch.Tensor,
    x: torch.Tensor,
    *,
    grid: Tuple[int, int],
    size: Tuple[int, int],
    block: nn.Module,
) -> torch.Tensor:
    """Value reconstruction for one branch: ``out_proj(A · resize(ln_1(x) W_vᵀ + b_v))``, no residual, no FFN.

    The main branch feeds the last block's input, the spatial branch the mean of intermediate block outputs
    (:func:`mean_block_outputs`); both share ``A``. One matrix for all heads equals per-head mixing.

    Args:
        attn: (B, M, M) :func:`scope_attention` on the VFM grid (I, J).
        x: (B, 1+N, D) tokens (CLS first) on the CLIP grid.
        grid: CLIP grid (gh, gw), N = gh·gw.
        size: VFM grid (I, J), M = I·J.
        block: CLIP's last block (open_clip ``ResidualAttentionBlock``: ``ln_1``, ``attn.in_proj_*``,
            ``attn.out_proj``).

    Returns:
        (B, M, D) branch output before ``ln_post``.
    """
    d = x.shape[-1]
    if attn.shape[-1] != size[0] * size[1] or x.shape[1] != 1 + grid[0] * grid[1]:
        raise InvalidInputError(f"attention {tuple(attn.shape)} / tokens {tuple(x.shape)} do not match the VFM grid "
                                f"{tuple(size)} / CLIP grid {tuple(grid)}")
    wv = block.attn.in_proj_weight[2 * d:]
    bv = None if block.attn.in_proj_bias is None else block.attn.in_proj_bias[2 * d:]
    v = F.linear(block.ln_1(x), wv, bv)  # (B, 1+N, D)
    v = resize_values(v[:, None], grid, size)[:, 0]  # (B, M, D), bilinear, align_corners False
    out = attn.to(v.dtype) @ v  # (B, M, D)
    return F.linear(out, block.attn.out_proj.weight, block.attn.out_proj.bias)



# ---------------------------------------------------------------------------------------------- spatial branch
def spatial_block_indices(num_layers: int) -> list:
    """0-based indices of the blocks whose outputs the spatial branch averages: ``L−2−NS .. L−3``.

    NS = 5 for 12 blocks (ViT-B: blocks 5..9), 12 for 24 (ViT-L: 10..21), 28 for 32 (ViT-H: 2..29),
    else L − 4.
    """
    ns = {12: 5, 24: 12, 32: 28}.get(int(num_layers), int(num_layers) - 4)
    first, last = num_layers - 2 - ns, num_layers - 3
    if ns < 1 or first < 0:
        raise InvalidInputError(f"CorrCLIP's spatial branch needs a CLIP with at least 5 blocks, got {num_layers}")
    return list(range(first, last + 1))


def mean_block_outputs(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of the chosen blocks' outputs (spatial branch input): list of (B, 1+N, D) -> (B, 1+N, D)."""
    if len(outputs) == 0:
        raise InvalidInputError("mean_block_outputs needs at least one block output")
    return torch.stack(list(outputs)).mean(dim=0)


# ---------------------------------------------------------------------------------------------- semantic branch
def region_token_allow(token_regions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention pattern of the region class tokens on the CLIP grid.

    One token per distinct id of each window (``U`` and the padding included), in ascending id order; token
    ``k`` attends to CLS and the patches of region ``k`` only (not to itself nor to other region tokens, and
    no CLS/patch token attends to region tokens, so the CLIP stream stays vanilla).

    Args:
        token_regions: (B, gh, gw) region ids on the CLIP grid.

    Returns:
        allow: (B, K, 1+N) bool, True = may attend (K = the largest region count in the batch; the rows of
            missing regions allow only CLS).
        valid: (B, K) bool, which rows are real regions.
        index: (B, gh, gw) int64, the region row of each patch.
    """
    _check_region_map(token_regions, "token_regions")
    b = token_regions.shape[0]
    flat = token_regions.flatten(1)  # (B, N)
    index = torch.empty_like(flat, dtype=torch.int64)
    counts = []
    for i in range(b):
        ids, inv = torch.unique(flat[i], return_inverse=True)
        index[i] = inv
        counts.append(ids.numel())
    k = max(counts)
    rows = torch.arange(k, device=flat.device)
    patches = index[:, None, :] == rows[None, :, None]  # (B, K, N)
    allow = torch.cat([torch.ones_like(patches[:, :, :1]), patches], dim=2)  # CLS always allowed
    valid = rows[None, :] < torch.tensor(counts, device=flat.device)[:, None]
    return allow, valid, index.view_as(token_regions)


def region_token_block(
    tokens: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allow: torch.Tensor,
    block: nn.Module,
) -> torch.Tensor:
    """One CLIP block for the region class tokens, reading the CLIP stream's keys/values of that block.

    ``t ← t + ls_1(out_proj(softmax_allowed(q_t kᵀ/√hd) v))``, ``t ← t + ls_2(mlp(ln_2(t)))`` with
    ``q_t = ln_1(t) W_qᵀ + b_q``. Since nobody attends to the region tokens, this equals running the block on
    the concatenated sequence with the reference's boolean mask.

    Args:
        tokens: (B, K, D) region tokens entering the block.
        k: (B, nh, 1+N, hd) the block's keys of the CLS/patch stream.
        v: (B, nh, 1+N, hd) the block's values.
        allow: (B, K, 1+N) bool from :func:`region_token_allow`.
        block: open_clip ``ResidualAttentionBlock``.

    Returns:
        (B, K, D) region tokens after the block.
    """
    b, kk, d = tokens.shape
    nh, hd = k.shape[1], k.shape[-1]
    if nh * hd != d or allow.shape != (b, kk, k.shape[2]):
        raise InvalidInputError(f"region tokens {tuple(tokens.shape)}, keys {tuple(k.shape)} and allow "
                                f"{tuple(allow.shape)} do not match")
    bq = None if block.attn.in_proj_bias is None else block.attn.in_proj_bias[:d]
    q = F.linear(block.ln_1(tokens), block.attn.in_proj_weight[:d], bq)  # (B, K, D)
    q = q.view(b, kk, nh, hd).transpose(1, 2)  # (B, nh, K, hd)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=allow[:, None])  # (B, nh, K, hd)
    a = a.transpose(1, 2).reshape(b, kk, d)
    tokens = tokens + block.ls_1(F.linear(a, block.attn.out_proj.weight, block.attn.out_proj.bias))
    return tokens + block.ls_2(block.mlp(block.ln_2(tokens)))


def region_tokens(
    cls_in: torch.Tensor,
    kv: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    blocks: Sequence[nn.Module],
    allow: torch.Tensor,
) -> torch.Tensor:
    """Region class tokens through every block (the last one in full: residual and FFN).

    Args:
        cls_in: (B, D) the CLS token entering block 0 (after ``ln_pre``); every region token starts as it.
        kv: per block, the (k, v) of the CLS/patch stream, each (B, nh, 1+N, hd).
        blocks: CLIP's blocks, as many as ``kv``.
        allow: (B, K, 1+N) from :func:`region_token_allow`.

    Returns:
        (B, K, D) region tokens after the last block (before ``ln_post``).
    """
    if len(kv) != len(blocks):
        raise InvalidInputError(f"need the keys/values of every block: {len(kv)} for {len(blocks)} blocks")
    t = cls_in[:, None, :].expand(-1, allow.shape[1], -1)  # (B, K, D)
    for (k, v), blk in zip(kv, blocks):
        t = region_token_block(t, k, v, allow, blk)
    return t


def scatter_region_tokens(tokens: torch.Tensor, index: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Give each VFM cell the token of its region: the CLIP-grid region index, nearest-resized to (I, J).

    Args:
        tokens: (B, K, D) region tokens.
        index: (B, gh, gw) int64 region row of each CLIP patch (:func:`region_token_allow`).
        size: VFM grid (I, J).

    Returns:
        (B, I·J, D).
    """
    idx = resize_region_map(index, size).flatten(1)  # (B, M)
    return torch.gather(tokens, 1, idx[..., None].expand(-1, -1, tokens.shape[-1]))


# ---------------------------------------------------------------------------------------------- fusion + post
def fuse_branches(
    main: torch.Tensor,
    spatial: torch.Tensor,
    semantic: torch.Tensor,
    *,
    ln_post: nn.Module,
    proj: Optional[torch.Tensor],
    alpha: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """``(ln_post(main) + α·ln_post(spatial) + β·ln_post(semantic)) @ proj`` (α = 1, β = 0.5).

    Args:
        main, spatial, semantic: (B, M, D) branch outputs.
        ln_post: CLIP's final LayerNorm.
        proj: (D, E) CLIP's projection (None: identity).

    Returns:
        (B, M, E) features in CLIP's joint space (not normalised).
    """
    x = ln_post(main) + ln_post(spatial) * alpha + ln_post(semantic) * beta
    return x @ proj if proj is not None else x


def merge_first_class_synonyms(probs: torch.Tensor, num_classes: int, *, dim: int = 0) -> torch.Tensor:
    """The reference's synonym merge: when Q > C, the first Q − C + 1 queries are class 0's and its score is
    their maximum; the other queries map one-to-one to classes 1..C−1.

    Equal to the general per-class maximum whenever only class 0 has synonyms and they come first (true of
    every class file of the reference).

    Args:
        probs: (..., Q, ...) per-query probabilities along ``dim``.
        num_classes: C.

    Returns:
        (..., C, ...).
    """
    q = probs.shape[dim]
    if num_classes > q or num_classes < 1:
        raise InvalidInputError(f"num_classes must be in [1, {q}] for {q} queries, got {num_classes}")
    if q == num_classes:
        return probs
    head = probs.narrow(dim, 0, q - num_classes + 1).amax(dim=dim, keepdim=True)
    return torch.cat([head, probs.narrow(dim, q - num_classes + 1, num_classes - 1)], dim=dim)


def region_vote(pred: torch.Tensor, regions: torch.Tensor, *, band_pixels: Optional[int] = None) -> torch.Tensor:
    """Per-region majority vote: every pixel of a region takes the region's most frequent label.

    The smallest id of the map (``U``, "unsegmented") keeps its pixels' labels. Ties go to the smallest label
    (what ``torch.mode`` returns). The reference votes on the original-size, unmerged region map after the
    probability threshold, so pixels sent to class 0 vote too.

    Args:
        pred: (H, W) or (B, H, W) int64 labels >= 0.
        regions: region ids of the same shape.
        band_pixels: process (H, W) maps in bands of rows of about this many pixels (two passes: count, then
            assign), so temporaries stay O(band) on large images; None = one pass over the whole map.

    Returns:
        Labels of the same shape.
    """
    _check_region_map(regions)
    if pred.shape != regions.shape:
        raise InvalidInputError(f"pred {tuple(pred.shape)} and regions {tuple(regions.shape)} must have one shape")
    if pred.dim() == 3:
        return torch.stack([region_vote(p, r, band_pixels=band_pixels) for p, r in zip(pred, regions)])
    if pred.numel() == 0:
        return pred
    if int(pred.min()) < 0:
        raise InvalidInputError(f"labels must be >= 0, got {int(pred.min())}")
    c = int(pred.max()) + 1
    h, w = pred.shape
    rows = h if band_pixels is None else max(1, int(band_pixels) // max(w, 1))
    bands = [(r, min(r + rows, h)) for r in range(0, h, rows)]
    if len(bands) == 1:
        ids, inv = torch.unique(regions.flatten(), return_inverse=True)  # inv == 0: U
    else:
        ids = torch.unique(torch.cat([torch.unique(regions[r0:r1]) for r0, r1 in bands]))  # ascending
    counts = torch.zeros(ids.numel() * c, dtype=torch.int64, device=pred.device)
    for r0, r1 in bands:
        idx = inv if len(bands) == 1 else torch.searchsorted(ids, regions[r0:r1].flatten())
        counts += torch.bincount(idx * c + pred[r0:r1].flatten().long(), minlength=ids.numel() * c)
    winner = counts.view(ids.numel(), c).argmax(dim=1).to(pred.dtype)  # (R,), first maximum = smallest label
    out = torch.empty_like(pred)
    for r0, r1 in bands:
        idx = inv if len(bands) == 1 else torch.searchsorted(ids, regions[r0:r1].flatten())
        band = pred[r0:r1].flatten()
        out[r0:r1] = torch.where(idx == 0, band, winner[idx]).view(r1 - r0, w)
    return out
