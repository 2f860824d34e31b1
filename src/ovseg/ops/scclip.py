"""SC-CLIP (Bai et al., "Self-Calibrated CLIP for Training-Free Open-Vocabulary Segmentation", IEEE TIP 2025):
the operations of its last CLIP layer, as computed by the official code (``SuleBai/SC-CLIP``, March 2025).

1. Anomaly tokens: a local-outlier score on the patch tokens entering the last block
   (:func:`lof_scores`, :func:`lof_anomalies`), each anomaly replaced by the mean of its non-anomalous
   8-neighbours (:func:`repair_anomalies`).
2. Self-adjusting: the cosine similarity ``S`` of a repaired intermediate layer re-aggregates the tokens
   through a cut, row-normalised copy (:func:`reaggregation_weights`) and guides the last block's
   attention (:func:`guided_attention_weights`; the paper's Eq. 5 as coded).
3. Multi-level fusion: the sum of several intermediate layers goes through the same last-block attention
   and is added (:func:`scclip_tokens`), both branches re-aggregated by a shallow layer's similarity.
4. Post-processing for VOC with background: :func:`area_filter`.

Token tensors are batch-first, patches only, row-major over the grid ``(gh, gw)``: (B, N, D) with N = gh·gw;
CLS tokens are passed separately. Every function treats each batch item on its own (the reference assumes
B = 1 and takes global statistics over the whole tensor, which is the same thing for one item).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError

__all__ = [
    "lof_scores", "lof_anomalies", "reference_anomaly_positions", "repair_anomalies", "cosine_similarity",
    "reaggregation_weights", "guided_attention_weights", "guided_attention", "fusion_sum", "scclip_tokens",
    "scclip_layers", "area_filter",
]

Grid = Tuple[int, int]


def _check_tokens(x: torch.Tensor, name: str, grid: Optional[Grid] = None) -> None:
    if not torch.is_tensor(x) or x.dim() != 3:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise InvalidInputError(f"{name} must be a (B, N, D) tensor, got {shape}")
    if grid is not None:
        gh, gw = grid
        if gh < 1 or gw < 1 or gh * gw != x.shape[1]:
            raise InvalidInputError(f"{name} has {x.shape[1]} tokens, which does not fit the grid {tuple(grid)}")


def _pairwise_sq_dist(x: torch.Tensor, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """``‖x_i − x_j‖²`` as the reference computes it (norm of the difference, then squared), (B, N, D) -> (B, N, N).

    Rows are processed in chunks so that at most ``chunk_elems`` differences (over the batch) exist at once; each
    entry is the same reduction as the reference's full (N, N, D) tensor, so the values are identical.
    """
    b, n, d = x.shape
    rows = max(1, chunk_elems // max(1, b * n * d))  # the whole batch's differences stay under chunk_elems
    out = x.new_empty((b, n, n))
    for i in range(0, n, rows):
        diff = x[:, i:i + rows, None, :] - x[:, None, :, :]  # (B, r, N, D)
        out[:, i:i + rows] = torch.linalg.vector_norm(diff, dim=-1) ** 2
    return out


def lof_scores(x: torch.Tensor, *, n_neighbors: int = 30) -> torch.Tensor:
    """SC-CLIP's local-outlier score of each token (the official ``lof_pytorch``, not scikit-learn's LOF).

    With ``d²`` the squared Euclidean distances, ``kNN(i)`` the ``n_neighbors`` nearest tokens after dropping the
    nearest one (the token itself) and ``kd(i) = d²(i, kNN(i)_last)``:

    - reach distance: ``max(d²(i, o), kd(i))`` — the token's *own* k-distance, so it always equals ``kd(i)``;
    - local reachability density: ``lrd(i) = k / nan_to_num(mean_o reach(i, o))`` = ``k / kd(i)``;
    - score: ``LOF(i) = mean_{o ∈ kNN(i)} lrd(o) / lrd(i)`` = ``mean_o kd(i) / kd(o)``.

    The operations (and so the rounding) follow the reference step by step.

    Args:
        x: (B, N, D) patch tokens (the input of CLIP's last block without CLS), N > ``n_neighbors``.
        n_neighbors: k (30 in SC-CLIP).

    Returns:
        (B, N) scores in the dtype of ``x``; larger is more anomalous.
    """
    _check_tokens(x, "x")
    k = int(n_neighbors)
    if k < 1 or x.shape[1] <= k:
        raise InvalidInputError(f"n_neighbors must be in [1, N-1] = [1, {x.shape[1] - 1}] for {x.shape[1]} tokens, "
                                f"got {n_neighbors}")
    d2 = _pairwise_sq_dist(x)  # (B, N, N)
    knn_d, knn_i = torch.topk(d2, k=k + 1, dim=-1, largest=False)  # ascending
    knn_d, knn_i = knn_d[..., 1:], knn_i[..., 1:]  # (B, N, k): drop the nearest (the token itself)
    k_dist = knn_d[..., -1:].expand_as(knn_d)  # kd(i)
    reach = torch.maximum(knn_d, k_dist)
    lrd = k / torch.nan_to_num(reach.mean(dim=-1), nan=1e-6)  # (B, N)
    ratios = torch.gather(lrd, 1, knn_i.flatten(1)).view_as(knn_i) / lrd.unsqueeze(-1)  # lrd(o) / lrd(i)
    return ratios.mean(dim=-1)


def lof_anomalies(x: torch.Tensor, *, n_neighbors: int = 30, contamination: float = 0.05) -> torch.Tensor:
    """Anomalous tokens: score strictly above the ``1 − contamination`` quantile (linear interpolation).

    For N = 196 (a 224 crop with ViT-B/16) that is exactly 10 tokens, for N = 256 13, when scores do not tie.
    The reference then crashes if no token is selected (all scores equal or NaN); here the mask is simply empty.

    Args:
        x: (B, N, D) patch tokens.
        n_neighbors: k of :func:`lof_scores`.
        contamination: expected share of anomalies, in (0, 1).

    Returns:
        (B, N) bool mask.
    """
    if not 0.0 < float(contamination) < 1.0:
        raise InvalidInputError(f"contamination must be in (0, 1), got {contamination}")
    scores = lof_scores(x, n_neighbors=n_neighbors)
    thr = torch.quantile(scores.float(), 1.0 - float(contamination), dim=-1, keepdim=True)  # (B, 1)
    return scores > thr


def reference_anomaly_positions(anomalies: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Where the reference actually repairs: token t is placed at (row, col) = (t // gh, t % gh).

    That is the row-major position only for square grids; for gh ≠ gw the reference repairs other tokens, or
    raises IndexError when (row, col) falls outside the grid — here an :class:`InvalidInputError`. Use it to
    reproduce the reference on non-square windows (e.g. an image side below the crop after resizing);
    :func:`scclip_tokens` does so with ``reference_positions=True``.

    Args:
        anomalies: (B, N) bool, row-major over ``grid``.
        grid: (gh, gw).

    Returns:
        (B, N) bool mask of the positions the reference modifies (row-major).
    """
    gh, gw = int(grid[0]), int(grid[1])
    if anomalies.dim() != 2 or anomalies.shape[1] != gh * gw:
        raise InvalidInputError(f"anomalies must be (B, {gh * gw}) for grid {tuple(grid)}, "
                                f"got {tuple(anomalies.shape)}")
    if gh == gw:
        return anomalies
    b_idx, t = anomalies.nonzero(as_tuple=True)
    row, col = torch.div(t, gh, rounding_mode="trunc"), t % gh
    bad = (row >= gh) | (col >= gw)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise InvalidInputError(
            f"the reference places anomalous token {int(t[i])} of a {gh}x{gw} grid at (row, col) = "
            f"({int(row[i])}, {int(col[i])}), outside the grid, and fails there (IndexError); use the row-major "
            "positions (reference_positions=False) for non-square grids")
    out = torch.zeros_like(anomalies)
    out[b_idx, row * gw + col] = True
    return out


def repair_anomalies(x: torch.Tensor, anomalies: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Replace each anomalous token by the mean of its in-image, non-anomalous 8-neighbours.

    All anomalies are replaced at once from the original values; one without any valid neighbour is kept.
    Computed like the reference: a zero-padded 3x3 depthwise sum (centre weight 0) of the masked map, divided
    by the count of valid neighbours.

    Args:
        x: (B, N, D) tokens, row-major over ``grid``.
        anomalies: (B, N) bool.
        grid: (gh, gw).

    Returns:
        (B, N, D) repaired tokens, same dtype.
    """
    _check_tokens(x, "x", grid)
    gh, gw = int(grid[0]), int(grid[1])
    b, n, d = x.shape
    if anomalies.shape != (b, n):
        raise InvalidInputError(f"anomalies must be ({b}, {n}) to match the tokens, got {tuple(anomalies.shape)}")
    fmap = x.transpose(1, 2).reshape(b, d, gh, gw)  # (B, D, gh, gw)
    keep = (~anomalies).to(x.dtype).view(b, 1, gh, gw)  # 1 = usable neighbour
    kernel = torch.ones(1, 1, 3, 3, device=x.device, dtype=x.dtype)
    kernel[..., 1, 1] = 0
    nsum = F.conv2d(F.pad(fmap * keep, (1, 1, 1, 1)), kernel.expand(d, 1, 3, 3), groups=d)  # (B, D, gh, gw)
    count = F.conv2d(F.pad(keep, (1, 1, 1, 1)), kernel)  # (B, 1, gh, gw)
    mean = nsum / torch.where(count == 0, torch.ones_like(count), count)
    update = anomalies.view(b, 1, gh, gw) & (count > 0)
    out = torch.where(update, mean, fmap)
    return out.reshape(b, d, n).transpose(1, 2)


def cosine_similarity(x: torch.Tensor) -> torch.Tensor:
    """``S = x̂ x̂ᵀ`` with ``x̂ = x / ‖x‖`` (no epsilon, as the reference): (B, N, D) -> (B, N, N)."""
    _check_tokens(x, "x")
    xn = x / x.norm(dim=-1, keepdim=True)
    return xn @ xn.transpose(1, 2)


def reaggregation_weights(sim: torch.Tensor, *, beta: float = 0.4, eps: float = 1e-6) -> torch.Tensor:
    """SC-CLIP's re-aggregation weights: similarities below ``beta`` set to 0, rows divided by their sum + ``eps``.

    ``weights @ x`` re-aggregates tokens (the reference's ``adaptively_aggregate``).

    Args:
        sim: (B, N, N) cosine similarities.
        beta: cut (0.4).
        eps: added to each row sum (1e-6 in the reference).

    Returns:
        (B, N, N), rows sum to ``rowsum / (rowsum + eps)`` ≈ 1 (0 for an all-cut row).
    """
    w = sim.masked_fill(sim < beta, 0.0)
    return w / (w.sum(dim=-1, keepdim=True) + eps)


def guided_attention_weights(sim: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None,
                             guide_scale: float = 3.0) -> torch.Tensor:
    """The last block's attention guided by an intermediate layer's similarity (SC-CLIP Eq. 5, as coded).

    ``G = softmax(mask(guide_scale · (S − mean(S))))`` where entries < 0 become −inf and the mean is one scalar per
    item over all N² entries; the weights are ``(G + softmax(k kᵀ · scale)) / 2`` — the paper's sum of the two
    softmaxes, halved. ``G`` is the same for every head; ``S`` is not cut here.

    Args:
        sim: (B, N, N) cosine similarity of the repaired guide layer.
        k: (B, nh, N, hd) keys of the last block (patch tokens only).
        scale: logit scale of k kᵀ (default hd^-0.5).
        guide_scale: 3.0 in the reference.

    Returns:
        (B, nh, N, N), rows sum to 1.
    """
    if k.dim() != 4 or sim.dim() != 3 or sim.shape[0] != k.shape[0] or sim.shape[-1] != k.shape[-2]:
        raise InvalidInputError(f"expected sim (B, N, N) and k (B, nh, N, hd) with matching B and N, got "
                                f"{tuple(sim.shape)} and {tuple(k.shape)}")
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    g = (sim - sim.mean(dim=(-2, -1), keepdim=True)) * guide_scale
    g = torch.softmax(g.masked_fill(g < 0.0, float("-inf")), dim=-1).unsqueeze(1)  # (B, 1, N, N)
    kk = torch.softmax((k @ k.transpose(-2, -1)) * scale, dim=-1)  # (B, nh, N, N)
    return (g + kk) / 2


def guided_attention(
    z: torch.Tensor,
    sim: torch.Tensor,
    *,
    in_proj_weight: torch.Tensor,
    in_proj_bias: Optional[torch.Tensor],
    out_proj_weight: torch.Tensor,
    out_proj_bias: Optional[torch.Tensor],
    num_heads: int,
    guide_scale: float = 3.0,
) -> torch.Tensor:
    """The last block's attention branch with :func:`guided_attention_weights`: ``out_proj(W v)``; q is unused.

    No residual, no LayerScale, no FFN (SC-CLIP drops them).

    Args:
        z: (B, N, D) ``ln_1`` of the patch tokens.
        sim: (B, N, N) guide similarity.
        in_proj_weight: (3D, D) the block's q/k/v in-projection; in_proj_bias: (3D,) or None.
        out_proj_weight: (D, D); out_proj_bias: (D,) or None.
        num_heads: heads of the block.
        guide_scale: see :func:`guided_attention_weights`.

    Returns:
        (B, N, D).
    """
    _check_tokens(z, "z")
    b, n, d = z.shape
    if d % num_heads:
        raise InvalidInputError(f"width {d} is not divisible by num_heads={num_heads}")
    hd = d // num_heads
    _, k, v = F.linear(z, in_proj_weight, in_proj_bias).chunk(3, dim=-1)
    k = k.reshape(b, n, num_heads, hd).transpose(1, 2)  # (B, nh, N, hd)
    v = v.reshape(b, n, num_heads, hd).transpose(1, 2)
    w = guided_attention_weights(sim, k, scale=hd ** -0.5, guide_scale=guide_scale)  # (B, nh, N, N)
    out = (w @ v).transpose(1, 2).reshape(b, n, d)
    return F.linear(out, out_proj_weight, out_proj_bias)


def fusion_sum(block_outputs: Mapping[int, torch.Tensor], layers: Tuple[int, int]) -> torch.Tensor:
    """Plain sum of the outputs of blocks ``layers[0]..layers[1]`` (1-indexed, inclusive), CLS included.

    Accumulated left to right from zero, like the reference. Returns (B, 1+N, D).
    """
    first, last = int(layers[0]), int(layers[1])
    missing = [i for i in range(first, last + 1) if i not in block_outputs]
    if first > last or missing:
        raise InvalidInputError(f"fusion layers {tuple(layers)} need the outputs of blocks {first}..{last}; "
                                f"missing {missing}")
    total = torch.zeros_like(block_outputs[first])
    for i in range(first, last + 1):
        total = total + block_outputs[i]
    return total


def scclip_layers(num_layers: int, *, pre_layer: int = 9, post_layer: int = 4,
                  fusion_layers: Tuple[int, int] = (4, 10)) -> Tuple[int, ...]:
    """The 1-indexed blocks whose outputs :func:`scclip_tokens` reads (the last block's input, block L−1,
    included), for a CLIP with ``num_layers`` blocks. ViT-B/16 defaults: (4, 5, ..., 11)."""
    last = int(num_layers) - 1
    need = {last, int(pre_layer), int(post_layer), *range(int(fusion_layers[0]), int(fusion_layers[1]) + 1)}
    bad = sorted(i for i in need if not 1 <= i <= last)
    if bad:
        raise InvalidInputError(f"layers {bad} are not blocks 1..{last} of a {num_layers}-block CLIP")
    return tuple(sorted(need))


def scclip_tokens(
    block_outputs: Mapping[int, torch.Tensor],
    grid: Grid,
    block: Any,
    *,
    num_layers: int,
    pre_layer: int = 9,
    post_layer: int = 4,
    fusion_layers: Tuple[int, int] = (4, 10),
    res_cls: float = 0.3,
    beta: float = 0.4,
    n_neighbors: int = 30,
    contamination: float = 0.05,
    guide_scale: float = 3.0,
    reference_positions: bool = False,
    return_intermediates: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
    """SC-CLIP's replacement of CLIP's last block, from the outputs of the earlier blocks (official defaults).

    With F_i the output of block i (1-indexed; F_{L−1} is the last block's input), attention ``A(·)`` =
    :func:`guided_attention` of the last block guided by ``S``::

        anomalies = lof_anomalies(F_{L−1}.patches)                       # LOF k = 30, 5 %
        P   = repair(F_{L−1}.patches)                                      # CLS dropped from here on
        S   = cos(repair(F_pre.patches))                                   # pre_layer 9
        P   = reaggregation_weights(S) @ P
        Y1  = A(ln_1(P)) + res_cls · F_{L−1}.cls                           # the CLS vector added to every token
        W   = reaggregation_weights(cos(F_post.patches))                   # post_layer 4, no repair
        M   = F_a + ... + F_b                                              # fusion_layers (4, 10), CLS included
        Y2  = A(ln_1(M.patches)) + res_cls · M.cls
        out = W @ Y1 + W @ Y2                                              # (B, N, D), then ln_post and proj

    Hyper-parameters map to the reference's as pre_layer = pre_adjust_idx + 1, post_layer = post_adjust_idx + 1,
    fusion_layers = (multi_start_idx + 1, multi_end_idx). ViT-L/14 (from the repository's first commit): 17, 7,
    (9, 19), res_cls 0.1.

    Args:
        block_outputs: 1-indexed block number -> (B, 1+N, D) output of that block, CLS first, row-major patches;
            must hold :func:`scclip_layers` (num_layers, ...).
        grid: (gh, gw) patch grid, N = gh·gw.
        block: CLIP's last block; only ``block.ln_1`` and ``block.attn`` (``in_proj_weight``, ``in_proj_bias``,
            ``out_proj``, ``num_heads``) are used — OpenAI's and open_clip's ``ResidualAttentionBlock`` both fit.
        num_layers: L, the number of blocks of the CLIP vision tower.
        res_cls: weight of the CLS term (0.3).
        beta: similarity cut of the re-aggregations (0.4).
        n_neighbors, contamination: of :func:`lof_anomalies`.
        guide_scale: of :func:`guided_attention_weights`.
        reference_positions: repair where the reference does on non-square grids
            (:func:`reference_anomaly_positions`); identical on square grids.
        return_intermediates: also return a dict of the stages (``anomalies``, ``repaired``, ``sim``, ``y1``,
            ``y2``, ...).

    Returns:
        (B, N, D) tokens before ``ln_post``; with ``return_intermediates`` a (tokens, dict) pair.
    """
    needed = scclip_layers(num_layers, pre_layer=pre_layer, post_layer=post_layer, fusion_layers=fusion_layers)
    last = int(num_layers) - 1
    for i in needed:
        if i not in block_outputs:
            raise InvalidInputError(f"block_outputs lacks block {i}; SC-CLIP reads blocks {needed}")
        _check_tokens(block_outputs[i][:, 1:], f"block_outputs[{i}] patches", grid)
    attn = block.attn
    branch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda z, s: guided_attention(  # noqa: E731
        z, s, in_proj_weight=attn.in_proj_weight, in_proj_bias=attn.in_proj_bias,
        out_proj_weight=attn.out_proj.weight, out_proj_bias=attn.out_proj.bias, num_heads=attn.num_heads,
        guide_scale=guide_scale)

    x = block_outputs[last]  # (B, 1+N, D), input of the last block
    cls, patches = x[:, :1], x[:, 1:]
    anomalies = lof_anomalies(patches, n_neighbors=n_neighbors, contamination=contamination)  # (B, N)
    where = reference_anomaly_positions(anomalies, grid) if reference_positions else anomalies
    repaired = repair_anomalies(patches, where, grid)  # (B, N, D)
    sim = cosine_similarity(repair_anomalies(block_outputs[pre_layer][:, 1:], where, grid))  # (B, N, N)
    pre_w = reaggregation_weights(sim, beta=beta)
    p = pre_w @ repaired
    y1 = branch(block.ln_1(p), sim) + res_cls * cls
    post_w = reaggregation_weights(cosine_similarity(block_outputs[post_layer][:, 1:]), beta=beta)
    y1 = post_w @ y1
    fused = fusion_sum(block_outputs, fusion_layers)  # (B, 1+N, D)
    y2 = branch(block.ln_1(fused[:, 1:]), sim) + res_cls * fused[:, :1]
    y2 = post_w @ y2
    out = y1 + y2
    if not return_intermediates:
        return out
    return out, {"anomalies": anomalies, "repaired_at": where, "repaired": repaired, "sim": sim,
                 "pre_weights": pre_w, "aggregated": p, "post_weights": post_w, "y1": y1, "fused": fused, "y2": y2}


def area_filter(scores: torch.Tensor, *, area_thd: float = 0.1) -> torch.Tensor:
    """SC-CLIP's (and SCLIP's) VOC post-processing on whole images: drop small foreground classes before the argmax.

    A class c ≥ 1 keeps its scores only if its argmax pixel count is strictly greater than ``area_thd`` times the
    total argmax count of classes ≥ 1; otherwise its map is set to 0. Class 0 (background) is never changed.
    This is the pipeline's ``area_threshold`` (:class:`ovseg.head.Head`, which the Segmenter applies band by band
    after a whole-image counting pass); this function applies the same head to tensors held in memory.

    Args:
        scores: (C, H, W) or (B, C, H, W) class probabilities of whole images.
        area_thd: 0.1 for VOC21.

    Returns:
        scores with the dropped classes zeroed (a new tensor, same shape and dtype).
    """
    from ..head import Head

    single = scores.dim() == 3
    s = scores.unsqueeze(0) if single else scores
    if s.dim() != 4 or s.shape[1] < 2:
        raise InvalidInputError(f"scores must be (C, H, W) or (B, C, H, W) with C >= 2, got {tuple(scores.shape)}")
    head = Head(area_threshold=float(area_thd))
    out = s.clone()
    for b in range(s.shape[0]):
        dropped = head.dropped_classes(head.area_counts(s[b]))  # (C,) bool or None
        if dropped is not None:
            out[b, dropped] = 0
    return out[0] if single else out
