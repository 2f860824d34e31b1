"""ResCLIP (Yang et al., "ResCLIP: Residual Attention for Training-free Dense Vision-language Inference",
CVPR 2025): its two attention terms as computed by the official code (``yvhangyang/ResCLIP``, March 2025).

- RCS, residual cross-correlation self-attention: the mean of the post-softmax q-k attention maps of
  intermediate blocks (6-9 of ViT-B/16, 1-indexed), mixed into the last block's attention weights:
  ``A = τ_rcs ((1 − λ_rcs) A_s + λ_rcs A_c)`` (:func:`rcs_attention`, :func:`residual_mix`).
- SFR, semantic feedback refinement: a first pass (with RCS) gives a segmentation of the window; its labels
  on the patch grid build a same-label matrix, decayed where the straight path between two patches leaves the
  label, blurred along the key index and row-normalised (:func:`label_grid`, :func:`connectivity`,
  :func:`sfr_bias`); the second pass mixes it into the attention *logits*
  ``L = τ_sfr ((1 − λ_sfr) L_s + λ_sfr Ŝ)`` before the softmax.

Both plug into three base methods' last-block attention (:func:`resclip_weights`): NACLIP (k-k logits + Gaussian
window, no residual/FFN; the paper's default), ClearCLIP (q-q, no residual/FFN) and SCLIP (q-q and k-k softmaxes
summed, residual and FFN kept), plus vanilla CLIP (q-k). Per-head tensors are (B, nh, T, hd), T = 1 + gh·gw with
CLS first; each batch item is treated on its own (the reference assumes B = 1).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..attention.gaussian import gaussian_window
from ..errors import InvalidInputError
from ..pamr import pamr

__all__ = [
    "BASES", "rcs_attention", "residual_mix", "feedback_probs", "label_grid", "connectivity", "sfr_bias",
    "normalize_sfr", "resclip_weights", "resclip_attention", "resclip_tokens",
]

Grid = Tuple[int, int]
Mix = Tuple[float, float]

# base -> (keeps the residual and FFN of the last block, the reference's --arch value)
BASES: Dict[str, Tuple[bool, str]] = {
    "naclip": (False, "wo_resi"),
    "clearclip": (False, "wo_resi"),
    "sclip": (True, "w_resi"),
    "vanilla": (True, "w_resi"),
}


def _check_base(base: str) -> None:
    if base not in BASES:
        raise InvalidInputError(f"unknown ResCLIP base {base!r}; use one of {sorted(BASES)}")


def rcs_attention(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """A_c: the mean of intermediate blocks' post-softmax attention maps, per head.

    Args:
        maps: (B, nh, T, T) maps of the chosen blocks (ResCLIP: blocks 6, 7, 8, 9, 1-indexed, for ViT-B/16 and,
            as coded, also for ViT-L/14), including the CLS row and column.

    Returns:
        (B, nh, T, T), rows sum to 1.
    """
    maps = list(maps)
    if not maps or any(m.shape != maps[0].shape or m.dim() != 4 for m in maps):
        raise InvalidInputError(f"rcs_attention needs one or more (B, nh, T, T) maps of equal shape, got "
                                f"{[tuple(m.shape) for m in maps]}")
    return torch.stack(maps).mean(dim=0)


def residual_mix(a: torch.Tensor, b: torch.Tensor, *, tau: float, lam: float) -> torch.Tensor:
    """``τ ((1 − λ) a + λ b)``: ResCLIP's mix for both RCS (on weights) and SFR (on logits).

    Rows of weights mixed this way sum to τ (2 in every config), and are not renormalised. PyTorch's type
    promotion applies as in the reference (an fp16 ``b`` keeps ``λ b`` in fp16).
    """
    return tau * ((1 - lam) * a + lam * b)


def feedback_probs(
    logits: torch.Tensor,
    image: torch.Tensor,
    *,
    logit_scale: float = 40.0,
    pamr_steps: int = 10,
    pamr_dilations: Sequence[int] = (8, 16),
) -> torch.Tensor:
    """First-pass probabilities of a window: patch logits -> crop size (bilinear) -> PAMR -> softmax over queries.

    The reference always refines the first pass with PAMR (10 steps, dilations 8 and 16) on the CLIP-normalised
    crop, even though its final PAMR is off; it skips it only on a RuntimeError (out of memory) — not here.

    Args:
        logits: (B, Q, gh, gw) cosine logits of the first pass (unit-norm features @ text embeddings).
        image: (B, 3, h, w) the CLIP-normalised window.
        logit_scale: 40.
        pamr_steps, pamr_dilations: of :func:`ovseg.pamr.pamr` (0 steps disables it).

    Returns:
        (B, Q, h, w) probabilities over *queries* (synonyms not merged), in the dtype of ``logits``.
    """
    if logits.dim() != 4 or image.dim() != 4 or logits.shape[0] != image.shape[0]:
        raise InvalidInputError(f"expected logits (B, Q, gh, gw) and image (B, 3, h, w), got "
                                f"{tuple(logits.shape)} and {tuple(image.shape)}")
    up = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    if pamr_steps > 0:
        up = pamr(image.float(), up.float(), steps=pamr_steps, dilations=pamr_dilations).to(logits.dtype)
    return torch.softmax(up * logit_scale, dim=1)


def label_grid(probs: torch.Tensor, *, patch_size: Union[int, Tuple[int, int]], temp_thd: float) -> torch.Tensor:
    """Per patch, the most frequent first-pass label of its pixels (the reference's ``create_patch_matrix``).

    Pixel label = argmax over queries (a query index; synonyms are different labels), set to 0 — query 0, whatever
    it is — where the best probability is below ``temp_thd``. Each patch takes the mode of its p×p pixels; ties go
    to the smallest label (CPU ``torch.mode``; the reference ran ``torch.mode`` on CUDA, whose tie-break is not
    specified). Pixels beyond the last whole patch are dropped.

    Args:
        probs: (B, Q, h, w) first-pass probabilities.
        patch_size: p, or (ph, pw).
        temp_thd: confidence threshold (0.10-0.50 in the configs).

    Returns:
        (B, h // ph, w // pw) int64 labels.
    """
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else (int(patch_size[0]), int(patch_size[1]))
    if probs.dim() != 4:
        raise InvalidInputError(f"probs must be (B, Q, h, w), got {tuple(probs.shape)}")
    b, q, h, w = probs.shape
    gh, gw = h // ph, w // pw
    if gh < 1 or gw < 1:
        raise InvalidInputError(f"a {h}x{w} window holds no whole {ph}x{pw} patch")
    best, lab = probs.max(dim=1)  # (B, h, w); ties to the lowest query
    lab = torch.where(best < temp_thd, torch.zeros_like(lab), lab)
    blocks = lab[:, :gh * ph, :gw * pw].reshape(b, gh, ph, gw, pw).permute(0, 1, 3, 2, 4).reshape(b, gh, gw, ph * pw)
    counts = torch.zeros(b, gh, gw, q, dtype=torch.long, device=probs.device)
    counts.scatter_add_(-1, blocks, torch.ones_like(blocks))
    return counts.argmax(dim=-1)  # first maximum = smallest label among ties


def _path_chunks(grid: Grid, device, rows: int):
    """Yield (row slice, cell index of every sampled path point (r, N, Dm+1), step-valid mask, Chebyshev steps)."""
    gh, gw = grid
    n = gh * gw
    idx = torch.arange(n, device=device)
    coords = torch.stack([torch.div(idx, gw, rounding_mode="floor"), idx % gw], dim=-1)  # (N, 2) (row, col)
    dm = max(gh, gw) - 1  # the largest Chebyshev distance on the grid
    t = torch.linspace(0, 1, steps=dm + 1, device=device).view(1, 1, -1, 1)  # (1, 1, Dm+1, 1)
    ks = torch.arange(dm + 1, device=device)
    for i in range(0, n, rows):
        start = coords[i:i + rows].view(-1, 1, 1, 2)  # (r, 1, 1, 2) long
        end = coords.view(1, n, 1, 2)
        steps = (end - start).abs().amax(dim=-1)  # (r, N, 1)
        # the reference's float expression, then round-half-to-even
        cur = (start * (1 - t) + end * t).round().long()  # (r, N, Dm+1, 2)
        yield slice(i, i + rows), cur[..., 0] * gw + cur[..., 1], ks <= steps, steps[..., 0]


def connectivity(labels: torch.Tensor, *, chunk: int = 64) -> torch.Tensor:
    """The reference's (truncated) same-label path test between every pair of patches (``check_path``).

    For patches i → j with Chebyshev distance d and D = max(gh, gw) − 1, the points
    ``round(P_i (1 − t_k) + P_j t_k)`` with ``t_k = k / D`` for k = 0..d are checked to carry i's label — i.e.
    only the first d/D of the segment (the full segment only when d = D); so adjacent patches always pass. Rounding
    is half-to-even on the reference's float32 expression.

    Args:
        labels: (B, gh, gw) int label grid.
        chunk: rows of the N×N pair matrix evaluated at once (memory only).

    Returns:
        (B, N, N) bool, N = gh·gw, row-major.
    """
    if labels.dim() != 3:
        raise InvalidInputError(f"labels must be (B, gh, gw), got {tuple(labels.shape)}")
    if int(chunk) < 1:
        raise InvalidInputError(f"chunk must be >= 1, got {chunk}")
    b, gh, gw = labels.shape
    n = gh * gw
    flat = labels.reshape(b, n)
    out = torch.empty(b, n, n, dtype=torch.bool, device=labels.device)
    for rows, cell, valid, _ in _path_chunks((gh, gw), labels.device, chunk):
        on_path = flat[:, cell]  # (B, r, N, Dm+1)
        same = on_path == flat[:, rows].view(b, -1, 1, 1)
        out[:, rows] = (same | ~valid).all(dim=-1)
    return out


def _chebyshev(grid: Grid, device) -> torch.Tensor:
    gh, gw = grid
    idx = torch.arange(gh * gw, device=device)
    r, c = torch.div(idx, gw, rounding_mode="floor"), idx % gw
    return torch.maximum((r[:, None] - r[None]).abs(), (c[:, None] - c[None]).abs())  # (N, N) long


def _blur_kernel(n: int, sigma: float, device) -> torch.Tensor:
    size = min(n, int(6 * sigma + 1))
    size = size if size % 2 == 1 else size + 1
    x = torch.arange(size, device=device) - size // 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def sfr_bias(labels: torch.Tensor, *, sigma: float = 5.0, delete_same_entity: bool = True) -> torch.Tensor:
    """SFR matrix S from a patch label grid (the reference's ``generate_attention_sfr``), computed in float32.

    ::

        M[i, j] = 1 if G_i == G_j else 0                                  # includes the diagonal
        M = where(connectivity, M, M · exp(−d(i, j) / D))                 # delete_same_entity; d Chebyshev, D max d
        R = conv1d(each row of M, Gaussian(σ), zero padding)              # 1-D along the *flattened key index*
        R = relu(R) / (rowsum(R) + 1e-8)
        S = [[0, 0], [0, R]]                                              # zero CLS row and column

    The kernel has ``min(N, int(6σ + 1))`` taps, made odd, normalised to sum 1. The blur runs across row ends of
    the grid (the reference's behaviour).

    Args:
        labels: (B, gh, gw) int label grid (:func:`label_grid`).
        sigma: the base method's Gaussian σ (5; the reference reuses NACLIP's ``gaussian_std``).
        delete_same_entity: the distance decay of disconnected same-label pairs (True in every config).

    Returns:
        (B, 1+N, 1+N) float32, rows of the patch block sum to ≈ 1.
    """
    if labels.dim() != 3:
        raise InvalidInputError(f"labels must be (B, gh, gw), got {tuple(labels.shape)}")
    if not sigma > 0:
        raise InvalidInputError(f"sigma must be > 0, got {sigma}")
    b, gh, gw = labels.shape
    n = gh * gw
    flat = labels.reshape(b, n)
    m = (flat[:, :, None] == flat[:, None, :]).float()  # (B, N, N)
    if delete_same_entity and n > 1:
        steps = _chebyshev((gh, gw), labels.device)
        decay = torch.exp(-steps / int(steps.max()))
        m = torch.where(connectivity(labels), m, m * decay)
    kernel = _blur_kernel(n, float(sigma), labels.device)
    r = F.conv1d(m.reshape(b * n, 1, n), kernel.view(1, 1, -1), padding=kernel.numel() // 2).view(b, n, n)
    r = F.relu(r)
    r = r / (r.sum(dim=-1, keepdim=True) + 1e-8)
    return F.pad(r, (1, 0, 1, 0))  # (B, 1+N, 1+N)


def normalize_sfr(s: torch.Tensor, *, fp16_round: bool = True) -> torch.Tensor:
    """Ŝ = S / max(S) (one maximum per item), rounded to float16 as the reference does.

    With ``fp16_round`` the result *is* float16, so :func:`residual_mix` reproduces the reference's promotion
    (``λ Ŝ`` in fp16, then added to the logits). (B, T, T) -> (B, T, T).
    """
    s_hat = s / s.amax(dim=(-2, -1), keepdim=True)
    return s_hat.to(torch.float16) if fp16_round else s_hat


def resclip_weights(
    q: Optional[torch.Tensor],
    k: Optional[torch.Tensor],
    *,
    base: str,
    grid: Grid,
    scale: Optional[float] = None,
    sigma: float = 5.0,
    rcs: Optional[torch.Tensor] = None,
    rcs_mix: Optional[Mix] = None,
    sfr: Optional[torch.Tensor] = None,
    sfr_mix: Optional[Mix] = None,
) -> torch.Tensor:
    """Last-block attention weights of a base method with ResCLIP's terms (the reference's ``custom_attn``).

    ======== ============================================== ======================================
    base     logits (each SFR-mixed before its softmax)      weights
    ======== ============================================== ======================================
    naclip   ``L = k kᵀ s``, then ``+ Ω`` (after the mix)      ``softmax(L)``
    clearclip ``L = q qᵀ s``                                  ``softmax(L)``
    sclip    ``Lq = q qᵀ s``, ``Lk = k kᵀ s``                    ``softmax(Lq) + softmax(Lk)``
    vanilla  ``L = (q s) kᵀ``                                 ``softmax(L)``
    ======== ============================================== ======================================

    then ``W = residual_mix(W, rcs)``. Ω is NACLIP's unnormalised Gaussian window (σ, zero CLS row/column).

    Args:
        q, k: (B, nh, T, hd); the ones the base does not read may be None.
        base: ``naclip``, ``clearclip``, ``sclip`` or ``vanilla``.
        grid: (gh, gw), T = 1 + gh·gw.
        scale: default hd^-0.5.
        sigma: Ω's σ (naclip).
        rcs: (B, nh, T, T) A_c (:func:`rcs_attention`) or None (no RCS).
        rcs_mix: (τ_rcs, λ_rcs), required with ``rcs``.
        sfr: (B, T, T) Ŝ (:func:`normalize_sfr`) or None (first pass).
        sfr_mix: (τ_sfr, λ_sfr), required with ``sfr``.

    Returns:
        (B, nh, T, T) weights; rows sum to τ_rcs with RCS (2 for sclip without it).
    """
    _check_base(base)
    if rcs is not None and rcs_mix is None or sfr is not None and sfr_mix is None:
        raise InvalidInputError("rcs needs rcs_mix=(tau, lambda) and sfr needs sfr_mix=(tau, lambda)")
    needs = {"naclip": "k", "clearclip": "q", "sclip": "qk", "vanilla": "qk"}[base]
    missing = [n for n, t in (("q", q), ("k", k)) if n in needs and t is None]
    if missing:
        raise InvalidInputError(f"base {base!r} reads {' and '.join(needs)}; got None for {', '.join(missing)}")
    ref = k if k is not None else q
    scale = ref.shape[-1] ** -0.5 if scale is None else scale
    s_hat = None if sfr is None else sfr.unsqueeze(1)  # (B, 1, T, T), shared by the heads

    def logits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        lg = (a @ b.transpose(-2, -1)) * scale
        return lg if s_hat is None else residual_mix(lg, s_hat, tau=sfr_mix[0], lam=sfr_mix[1])

    if base == "naclip":
        lg = logits(k, k)
        omega = gaussian_window(grid, sigma, device=lg.device, dtype=lg.dtype)
        if omega.shape[-1] != lg.shape[-1]:
            raise InvalidInputError(f"{lg.shape[-1]} tokens do not fit 1 + grid {tuple(grid)}")
        w = torch.softmax(lg + omega, dim=-1)
    elif base == "clearclip":
        w = torch.softmax(logits(q, q), dim=-1)
    elif base == "sclip":
        w = torch.softmax(logits(q, q), dim=-1) + torch.softmax(logits(k, k), dim=-1)
    else:  # vanilla: (q s) kᵀ
        lg = (q * scale) @ k.transpose(-2, -1)
        lg = lg if s_hat is None else residual_mix(lg, s_hat, tau=sfr_mix[0], lam=sfr_mix[1])
        w = torch.softmax(lg, dim=-1)
    if rcs is not None:
        w = residual_mix(w, rcs, tau=rcs_mix[0], lam=rcs_mix[1])
    return w


def resclip_attention(
    q: Optional[torch.Tensor],
    k: Optional[torch.Tensor],
    v: torch.Tensor,
    *,
    base: str,
    grid: Grid,
    scale: Optional[float] = None,
    sigma: float = 5.0,
    rcs: Optional[torch.Tensor] = None,
    rcs_mix: Optional[Mix] = None,
    sfr: Optional[torch.Tensor] = None,
    sfr_mix: Optional[Mix] = None,
    **_: object,
) -> torch.Tensor:
    """``resclip_weights(...) @ v`` in the ``ovseg.attention`` calling convention: (B, nh, T, hd) -> (B, nh, T, hd)."""
    w = resclip_weights(q, k, base=base, grid=grid, scale=scale, sigma=sigma, rcs=rcs, rcs_mix=rcs_mix, sfr=sfr,
                        sfr_mix=sfr_mix)
    return w.to(v.dtype) @ v


def _last_block(x: torch.Tensor, block: Any, base: str, residual: bool, grid: Grid, **attn_kw: Any) -> torch.Tensor:
    """CLIP's last block with :func:`resclip_attention`; (B, T, D) -> (B, T, D)."""
    attn = block.attn
    b, t, d = x.shape
    nh = attn.num_heads
    hd = d // nh
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (z.reshape(b, t, nh, hd).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hd)
    out = resclip_attention(q, k, v, base=base, grid=grid, scale=hd ** -0.5, **attn_kw)
    out = F.linear(out.transpose(1, 2).reshape(b, t, d), attn.out_proj.weight, attn.out_proj.bias)
    if not residual:
        return out
    out = x + out
    return out + block.mlp(block.ln_2(out))


def resclip_tokens(
    x: torch.Tensor,
    attn_maps: Sequence[torch.Tensor],
    block: Any,
    project: Callable[[torch.Tensor], torch.Tensor],
    text: torch.Tensor,
    image: torch.Tensor,
    *,
    patch_size: Union[int, Tuple[int, int]],
    base: str = "naclip",
    temp_thd: float,
    rcs_mix: Optional[Mix] = (2.0, 0.3),
    sfr_mix: Optional[Mix] = (1.8, 0.7),
    residual: Optional[bool] = None,
    sigma: float = 5.0,
    logit_scale: float = 40.0,
    pamr_steps: int = 10,
    pamr_dilations: Sequence[int] = (8, 16),
    delete_same_entity: bool = True,
    fp16_round: bool = True,
    return_intermediates: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
    """ResCLIP's two passes through CLIP's last block for a batch of windows.

    ::

        A_c = rcs_attention(attn_maps)                                  # blocks 6-9
        y1  = last_block(x, base weights, RCS)                          # pass 1
        P1  = feedback_probs(normalize(project(y1)[:, 1:]) @ textᵀ)     # crop size, PAMR, softmax over queries
        S   = normalize_sfr(sfr_bias(label_grid(P1, temp_thd)))
        y2  = last_block(x, base weights with S mixed into the logits, RCS)   # pass 2 -> returned

    Passing ``rcs_mix=None`` / ``sfr_mix=None`` drops that term (ablations the reference's configs cannot run:
    its ``use_rcs``/``use_sfr`` flags are stored as always-true tuples).

    Args:
        x: (B, T, D) input of the last block (output of block L−1), CLS first.
        attn_maps: (B, nh, T, T) post-softmax attention of the RCS blocks (6, 7, 8, 9).
        block: the last block (``ln_1``, ``attn.in_proj_weight/bias``, ``attn.out_proj``, ``attn.num_heads``;
            ``ln_2`` and ``mlp`` for the residual bases). LayerScale is not applied (CLIP has none).
        project: (B, T, D) -> (B, T, E), CLIP's ``ln_post`` then ``proj``.
        text: (Q, E) unit-norm query embeddings (synonyms as separate queries).
        image: (B, 3, h, w) the CLIP-normalised windows (for the pass-1 PAMR and its resolution).
        patch_size: CLIP's patch size p (or (ph, pw)); the grid is (h // ph, w // pw).
        base: ``naclip`` (default, the paper's main result), ``clearclip``, ``sclip`` or ``vanilla``.
        temp_thd: pass-1 confidence threshold (per dataset: 0.10-0.50).
        rcs_mix, sfr_mix: (τ, λ) per dataset.
        residual: keep the residual and FFN of the last block (default: per base, see :data:`BASES`).
        sigma: Gaussian σ of Ω and of the SFR blur (5).
        logit_scale, pamr_steps, pamr_dilations: of :func:`feedback_probs`.
        delete_same_entity: of :func:`sfr_bias`.
        fp16_round: of :func:`normalize_sfr`.
        return_intermediates: also return a dict (``rcs``, ``probs``, ``labels``, ``sfr``, ``pass1``).

    Returns:
        (B, T, D) output of the last block (pass 2); with ``return_intermediates`` a (tokens, dict) pair.
    """
    _check_base(base)
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else (int(patch_size[0]), int(patch_size[1]))
    grid = (image.shape[-2] // ph, image.shape[-1] // pw)
    if x.dim() != 3 or x.shape[1] != 1 + grid[0] * grid[1] or image.shape[0] != x.shape[0]:
        raise InvalidInputError(f"x must be (B, 1 + {grid[0]}*{grid[1]}, D) for {tuple(image.shape)} windows and "
                                f"patch size {(ph, pw)}, got {tuple(x.shape)}")
    residual = BASES[base][0] if residual is None else bool(residual)
    rcs = rcs_attention(attn_maps) if rcs_mix is not None else None
    kw = dict(sigma=sigma, rcs=rcs, rcs_mix=rcs_mix)
    y1 = _last_block(x, block, base, residual, grid, **kw)
    inter: Dict[str, torch.Tensor] = {"rcs": rcs, "pass1": y1} if return_intermediates else {}
    if sfr_mix is None:
        return (y1, inter) if return_intermediates else y1
    b = x.shape[0]
    feats = project(y1)[:, 1:]
    feats = feats / feats.norm(dim=-1, keepdim=True)
    logits = (feats @ text.to(feats.dtype).t()).transpose(1, 2).reshape(b, -1, grid[0], grid[1])  # (B, Q, gh, gw)
    probs = feedback_probs(logits, image, logit_scale=logit_scale, pamr_steps=pamr_steps,
                           pamr_dilations=pamr_dilations)
    labels = label_grid(probs, patch_size=(ph, pw), temp_thd=temp_thd)
    s = sfr_bias(labels, sigma=sigma, delete_same_entity=delete_same_entity)
    s_hat = normalize_sfr(s, fp16_round=fp16_round)
    y2 = _last_block(x, block, base, residual, grid, sfr=s_hat, sfr_mix=sfr_mix, **kw)
    if not return_intermediates:
        return y2
    inter.update(probs=probs, labels=labels, sfr=s, sfr_hat=s_hat)
    return y2, inter
