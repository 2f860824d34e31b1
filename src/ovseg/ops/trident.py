"""Trident (Shi, Dong & Xu, ICCV 2025, "Harnessing Vision Foundation Models for High-Performance, Training-Free
Open Vocabulary Segmentation"): the operations of its reference code at test time, as pure tensor functions.

Pipeline (splice-then-segment; paper Sec. 3): the input is up-scaled so its sides are multiples of the CLIP
patch; CLIP's last block runs ProxyCLIP-style proxy attention on DINO features in every sub-image (one similarity
mean for *all* windows of an image); the per-window outputs are spliced into one token map (sum / count); SAM's
last global attention block gives a correlation matrix (attention entries kept where the cosine of SAM's values
beats a per-query threshold, head mean, row normalisation) that aggregates the spliced map on SAM's grid; the
coarse mask is optionally refined by prompting SAM with points, boxes and masks of its connected regions.

Every function takes a leading batch dimension where the reference assumes one image, and a batch equals
one-by-one. Defaults reproduce the reference, including its quirks; the corrected behaviours are options.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..attention.proxy import resize_values
from ..errors import InvalidInputError
from ..sliding import window_grid

__all__ = [
    "input_size", "upscale_input", "window_token_boxes",
    "window_similarity_sums", "image_proxy_weights", "window_values",
    "window_grid_ratio", "to_window_grid", "splice_windows",
    "sam_source_size", "resize_linear_uint8", "sam_resize_shape", "sam_valid_grid", "sam_preprocess",
    "sam_rel_pos", "sam_rel_bias", "sam_attention", "crop_valid",
    "sam_thresholds", "sam_correlation", "sam_global_weights",
    "aggregate", "aggregate_halves",
    "merge_first_class_synonyms", "postprocess",
    "class_regions", "coarse_regions", "prompt_tensors", "mask_downscale", "sam_masks_to_image",
    "refined_class_score", "merge_refinement", "merge_failed_regions",
]

Size = Tuple[int, int]

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def _ceil_to(n: int, p: int) -> int:
    return n if n % p == 0 else (n // p + 1) * p


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInputError(f"{name} must be a positive int, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------ input geometry
def input_size(height: int, width: int, *, patch: int, crop: int = 336, always_min: bool = False) -> Size:
    """Size the CLIP/DINO input is resized to (reference ``preprocess_image``): sides up to multiples of ``patch``.

    If both sides already are multiples of ``patch`` the input is kept as is, *without* the minimum-size check
    (reference). Otherwise the longer side L goes up to ``ceil_p(L)``, each side is scaled by ``ceil_p(L) / L``,
    truncated, rounded up to a multiple of ``patch`` and raised to at least ``crop``. The aspect ratio therefore
    changes slightly (e.g. 448x597 -> 464x608 for p = 16).

    Args:
        height, width: size of the (dataset-resized) image.
        patch: CLIP patch size (16 for ViT-B/16, 14 for ViT-L/14 and ViT-H/14).
        crop: sub-image size; sides below it are raised to it.
        always_min: also enforce ``crop`` when the sides are already multiples of ``patch`` (the reference skips
            it there, and then cuts non-square sub-images, which its splicing cannot handle).

    Returns:
        (height', width'), multiples of ``patch``.
    """
    for name, v in (("height", height), ("width", width), ("patch", patch), ("crop", crop)):
        _positive(name, v)
    if height % patch == 0 and width % patch == 0:
        return (max(height, crop), max(width, crop)) if always_min else (height, width)
    longer = max(height, width)
    target = _ceil_to(longer, patch)
    h = _ceil_to(int(height * target / longer), patch)
    w = _ceil_to(int(width * target / longer), patch)
    return max(h, crop), max(w, crop)


def upscale_input(x: torch.Tensor, *, patch: int, crop: int = 336, always_min: bool = False) -> torch.Tensor:
    """Resize CLIP-normalised images (B, 3, H, W) to :func:`input_size` (bilinear, align_corners False, no
    antialias, on the normalised values as the reference does). Returns ``x`` itself when the size is kept."""
    if x.dim() != 4:
        raise InvalidInputError(f"images must be (B, 3, H, W), got shape {tuple(x.shape)}")
    size = input_size(x.shape[-2], x.shape[-1], patch=patch, crop=crop, always_min=always_min)
    if size == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def window_token_boxes(height: int, width: int, *, patch: int, window: int = 336, stride: int = 224) -> torch.Tensor:
    """Sub-image boxes of mmseg's sliding grid in CLIP *token* units, row-major (reference ``get_windowed_imgs``).

    Args:
        height, width: the up-scaled input size (multiples of ``patch``).
        patch: CLIP patch size; window corners must fall on token borders (the reference asserts it).
        window, stride: sub-image size and step in pixels.

    Returns:
        (N, 4) int64 boxes ``(y1, x1, y2, x2)`` in tokens; windows smaller than ``window`` only when the image is.
    """
    _positive("window", window)
    _positive("stride", stride)
    boxes = window_grid(height, width, (window, window), (stride, stride))
    out = []
    for y1, y2, x1, x2 in boxes:
        if any(c % patch for c in (y1, y2, x1, x2)):
            raise InvalidInputError(
                f"window ({y1}:{y2}, {x1}:{x2}) of a {height}x{width} input does not fall on {patch}-pixel token "
                f"borders; use input_size() first and a window/stride that are multiples of {patch}")
        out.append((y1 // patch, x1 // patch, y2 // patch, x2 // patch))
    return torch.tensor(out, dtype=torch.long)


# ------------------------------------------------------------------------------------------------ proxy attention
def window_similarity_sums(feats: torch.Tensor) -> torch.Tensor:
    """Sum of every entry of each window's cosine-similarity matrix ``S = X̂ᵀX̂``: (W, C, I, J) -> (W,).

    Lets a caller that runs the windows of one image in several batches form the image's mean first:
    ``μ = Σ_w sums_w / (N · M²)`` (then pass it as ``mean`` to :func:`image_proxy_weights`). Computed as
    ``‖Σ_m x̂_m‖²`` without forming S.
    """
    if feats.dim() != 4:
        raise InvalidInputError(f"VFM features must be (W, C, I, J), got shape {tuple(feats.shape)}")
    x = F.normalize(feats.flatten(2), dim=1)  # (W, C, M)
    return x.sum(dim=2).pow(2).sum(dim=1)


def image_proxy_weights(
    feats: torch.Tensor,
    *,
    windows_per_image: int,
    beta: float = 1.2,
    gamma: float = 3.0,
    keep_diagonal: bool = False,
    mean: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """ProxyCLIP's proxy attention with ONE similarity mean over all sub-images of an image (Trident).

    ``S = X̂ᵀX̂`` per window (cosine of the VFM features), ``μ`` = mean of S over every entry of every window of
    the same image, ``A = γ (S − β μ)``, entries ``A < 0`` set to −inf, softmax over keys.

    Args:
        feats: VFM features (W, C, I, J) of W = B·N windows, image-major (N consecutive windows per image).
        windows_per_image: N.
        beta, gamma: ProxyCLIP's β and γ.
        keep_diagonal: never mask ``S_ii`` (a row of a nearly uniform image is then finite instead of NaN; rows
            that the reference leaves finite are unchanged). Default False: the reference.
        mean: optional (W,) image mean for each window (see :func:`window_similarity_sums`), when ``feats`` holds
            only part of an image's windows; ``windows_per_image`` is then not used.

    Returns:
        (W, M, M) row-stochastic weights, M = I·J row-major, in ``feats``' dtype.
    """
    if feats.dim() != 4:
        raise InvalidInputError(f"VFM features must be (W, C, I, J), got shape {tuple(feats.shape)}")
    x = F.normalize(feats.flatten(2), dim=1)  # (W, C, M)
    sim = x.transpose(1, 2) @ x  # (W, M, M)
    w, m, _ = sim.shape
    if mean is None:
        n = _positive("windows_per_image", windows_per_image)
        if w % n:
            raise InvalidInputError(f"{w} windows are not a whole number of images of {n} windows")
        mu = sim.view(w // n, n * m * m).mean(dim=1).repeat_interleave(n)  # (W,) one mean per image
    else:
        if mean.shape != (w,):
            raise InvalidInputError(f"mean must hold one value per window, shape ({w},), got {tuple(mean.shape)}")
        mu = mean.to(sim.dtype)
    logits = (sim - beta * mu.view(w, 1, 1)) * gamma
    mask = logits < 0
    if keep_diagonal:
        mask.diagonal(dim1=1, dim2=2).fill_(False)
    return torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1)


def window_values(
    v: torch.Tensor,
    *,
    grid: Size,
    vfm_feats: torch.Tensor,
    windows_per_image: int,
    beta: float = 1.2,
    gamma: float = 3.0,
    keep_diagonal: bool = False,
    mean: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """CLIP's last-block values mixed by :func:`image_proxy_weights` (before ``out_proj``; no residual, no FFN).

    The CLIP values (grid ``gh x gw``) are resized bilinearly to the VFM grid ``I x J`` first: the identity for
    ViT-B/16 with DINO-B/16 (21 -> 21 at 336), 24 -> 21 for ViT-L/14 and ViT-H/14.

    Args:
        v: last-block values (W, nh, 1+gh·gw, hd), CLS first (dropped; the reference drops CLS before the block,
            which gives the same values since ``ln_1`` and the projection act per token).
        grid: CLIP token grid (gh, gw) of a window.
        vfm_feats: (W, C, I, J) DINO features of the same windows.
        windows_per_image, beta, gamma, keep_diagonal, mean: see :func:`image_proxy_weights`.

    Returns:
        (W, nh, I·J, hd).
    """
    if vfm_feats.shape[0] != v.shape[0]:
        raise InvalidInputError(f"batch mismatch: {vfm_feats.shape[0]} VFM maps for {v.shape[0]} windows")
    size = tuple(vfm_feats.shape[-2:])
    attn = image_proxy_weights(vfm_feats, windows_per_image=windows_per_image, beta=beta, gamma=gamma,
                               keep_diagonal=keep_diagonal, mean=mean).to(v.dtype)  # (W, M, M)
    vg = resize_values(v, grid, size)  # (W, nh, M, hd)
    return attn.unsqueeze(1) @ vg


# ------------------------------------------------------------------------------------------------ splicing
def window_grid_ratio(vfm_grid: int, clip_grid: int) -> Tuple[int, int]:
    """The reference's rule for the grid on which window outputs are spliced: ``(ratio, side)``.

    If the VFM grid side is not a multiple of the CLIP grid side, the window outputs are resized to
    ``clip_grid · round(vfm_grid / clip_grid)``; otherwise ratio = vfm_grid // clip_grid and they are kept.
    With DINO-B/16 and CLIP patches 14/16 the ratio is always 1 (21 -> 21 for B/16, 21 -> 24 for L/14, H/14).
    """
    if vfm_grid % clip_grid:
        ratio = int(round(vfm_grid / clip_grid))
    else:
        ratio = vfm_grid // clip_grid
    return ratio, clip_grid * ratio


def to_window_grid(z: torch.Tensor, side) -> torch.Tensor:
    """Window outputs (W, D, I, J) -> (W, D, side, side) (or (W, D, h, w) for a pair ``side = (h, w)``): bilinear
    (align_corners False) unless already there."""
    size = (side, side) if isinstance(side, int) else tuple(side)
    if tuple(z.shape[-2:]) == size:
        return z
    return F.interpolate(z, size=size, mode="bilinear", align_corners=False)


def splice_windows(z: torch.Tensor, boxes: torch.Tensor, grid: Size, *, ratio: int = 1) -> torch.Tensor:
    """Splice window outputs into one map per image: per-cell sum over windows divided by the window count.

    Sum and count are accumulated in ``z``'s dtype, window by window in row-major order, like the reference
    (fp16 there; counts are small integers, exact in fp16).

    Args:
        z: (B, N, D, h, w) outputs of the N windows of each of B images (same boxes for every image).
        boxes: (N, 4) ``(y1, x1, y2, x2)`` in tokens (:func:`window_token_boxes`); box sides times ``ratio`` must
            equal (h, w).
        grid: the image's token grid (gh, gw).
        ratio: cells per token (:func:`window_grid_ratio`).

    Returns:
        (B, D, gh·ratio, gw·ratio).
    """
    if z.dim() != 5:
        raise InvalidInputError(f"window outputs must be (B, N, D, h, w), got shape {tuple(z.shape)}")
    if boxes.shape != (z.shape[1], 4):
        raise InvalidInputError(f"expected {z.shape[1]} boxes of 4 coordinates, got shape {tuple(boxes.shape)}")
    b, n, d, h, w = z.shape
    out = z.new_zeros((b, d, grid[0] * ratio, grid[1] * ratio))
    count = z.new_zeros((1, 1, grid[0] * ratio, grid[1] * ratio))
    for i, (y1, x1, y2, x2) in enumerate((boxes * ratio).tolist()):
        if (y2 - y1, x2 - x1) != (h, w) or y2 > out.shape[-2] or x2 > out.shape[-1] or min(y1, x1) < 0:
            raise InvalidInputError(f"box {boxes[i].tolist()} (x{ratio}) does not hold a {h}x{w} window output "
                                    f"inside the {tuple(grid)} grid")
        out[:, :, y1:y2, x1:x2] += z[:, i]
        count[:, :, y1:y2, x1:x2] += 1
    return out / count


# ------------------------------------------------------------------------------------------------ SAM input
def sam_source_size(height: int, width: int, *, patch: int) -> Size:
    """Size of the picture given to SAM: the *original* image with both sides rounded up to multiples of the
    CLIP patch (reference: ``cv2.resize``, bilinear without antialias, on uint8: :func:`resize_linear_uint8`)."""
    return _ceil_to(_positive("height", height), patch), _ceil_to(_positive("width", width), patch)


def _cv2_coefficients(out_len: int, in_len: int, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """OpenCV's INTER_LINEAR source indices and 11-bit fixed-point weights along one axis."""
    scale = 1.0 / (out_len / in_len)  # OpenCV: scale = 1 / inv_scale, in double
    f = ((torch.arange(out_len, dtype=torch.float64, device=device) + 0.5) * scale - 0.5).to(torch.float32)
    s = torch.floor(f)
    f = f - s  # the fraction is kept at the borders; only the indices are clamped
    s = s.long()
    w1 = torch.round(f * 2048).to(torch.int32)  # saturate_cast<short>: round half to even
    w0 = torch.round((1 - f) * 2048).to(torch.int32)
    return s.clamp(0, in_len - 1), (s + 1).clamp(0, in_len - 1), w0, w1


def resize_linear_uint8(img: torch.Tensor, size: Size) -> torch.Tensor:
    """Bilinear resize of uint8 images with OpenCV's fixed-point ``INTER_LINEAR`` rule (what the reference's
    ``cv2.resize`` computes for the SAM picture), in integer arithmetic.

    Horizontal pass with 11-bit weights (exact integers), vertical pass as OpenCV's vectorised kernel:
    ``((((S0 >> 4) · b0) >> 16) + (((S1 >> 4) · b1) >> 16) + 2) >> 2``. It equals ``cv2.resize(..., INTER_LINEAR)``
    on the up-scalings Trident uses (checked against OpenCV 5.0 on 300 random sizes); PyTorch's own uint8 bilinear
    differs from it by one grey level on ~20 % of the values.

    Args:
        img: (..., H, W) uint8.
        size: output (h, w).

    Returns:
        (..., h, w) uint8.
    """
    if img.dtype != torch.uint8 or img.dim() < 2:
        raise InvalidInputError(f"expected a uint8 image (..., H, W), got {tuple(img.shape)} {img.dtype}")
    h, w = _positive("height", int(size[0])), _positive("width", int(size[1]))
    if (h, w) == tuple(img.shape[-2:]):
        return img
    x0, x1, a0, a1 = _cv2_coefficients(w, img.shape[-1], img.device)
    y0, y1, b0, b1 = _cv2_coefficients(h, img.shape[-2], img.device)
    x = img.to(torch.int32)
    rows = x[..., x0] * a0 + x[..., x1] * a1  # (..., H, w), fixed point x 2048
    out = (((rows[..., y0, :] >> 4) * b0[:, None]) >> 16) + (((rows[..., y1, :] >> 4) * b1[:, None]) >> 16)
    return ((out + 2) >> 2).clamp(0, 255).to(torch.uint8)


def sam_resize_shape(height: int, width: int, long_side: int = 1024) -> Size:
    """SAM's ``ResizeLongestSide.get_preprocess_shape``: longer side to ``long_side``, the other scaled and
    rounded half up."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_valid_grid(resized: Size, patch: int = 16) -> Size:
    """SAM tokens covering the resized picture (the rest of the padded 64x64 grid is padding): floor division."""
    return resized[0] // patch, resized[1] // patch


def sam_preprocess(
    img: torch.Tensor,
    *,
    long_side: int = 1024,
    mean: Sequence[float] = SAM_PIXEL_MEAN,
    std: Sequence[float] = SAM_PIXEL_STD,
    dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, Size]:
    """SAM's image input: resize the longest side to ``long_side``, normalise with SAM's pixel mean/std, zero-pad
    right and bottom to a square.

    The resize is bilinear with antialiasing on uint8 (PyTorch's PIL-compatible path; the reference resizes a
    PIL image, so values can differ by one grey level). The reference normalises with fp16 buffers
    (``dtype=torch.float16`` gives the same rounding of mean and std).

    Args:
        img: (B, 3, H, W) uint8 RGB.
        long_side: SAM's input side (1024).
        mean, std: SAM's pixel statistics on 0-255.
        dtype: dtype of the normalisation and of the result.

    Returns:
        ((B, 3, long_side, long_side) normalised and padded, (h, w) resized size before padding).
    """
    if img.dim() != 4 or img.shape[1] != 3 or img.dtype != torch.uint8:
        raise InvalidInputError(f"SAM input must be (B, 3, H, W) uint8, got {tuple(img.shape)} {img.dtype}")
    size = sam_resize_shape(img.shape[-2], img.shape[-1], long_side)
    x = img
    if size != tuple(img.shape[-2:]):
        x = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=True)  # uint8 path
    m = torch.tensor(mean, dtype=dtype, device=img.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=img.device).view(1, 3, 1, 1)
    x = (x.to(dtype) - m) / s
    x = F.pad(x, (0, long_side - size[1], 0, long_side - size[0]))
    return x, size


# ------------------------------------------------------------------------------------------------ SAM attention
def sam_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """SAM's relative position table for one axis: (L, hd) -> (q_size, k_size, hd).

    The table is linearly resized to ``2·max(q, k) − 1`` entries when needed; the coordinates of the shorter
    axis are scaled (SAM's ``get_rel_pos``).
    """
    max_dist = 2 * max(q_size, k_size) - 1
    table = rel_pos
    if rel_pos.shape[0] != max_dist:
        table = F.interpolate(rel_pos.t()[None], size=max_dist, mode="linear")[0].t()  # (max_dist, hd)
    q = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    idx = (q - k) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[idx.long()]


def _rel_bias(q: torch.Tensor, rh: torch.Tensor, rw: torch.Tensor, rows: torch.Tensor, size: Size) -> torch.Tensor:
    """Decomposed relative-position bias of the queries ``rows``: q (B, nh, r, hd) -> (B, nh, r, H·W)."""
    h, w = size
    ys, xs = rows // w, rows % w
    bias_h = torch.einsum("bnrc,rkc->bnrk", q, rh[ys])  # (B, nh, r, H)
    bias_w = torch.einsum("bnrc,rkc->bnrk", q, rw[xs])  # (B, nh, r, W)
    return (bias_h[..., :, None] + bias_w[..., None, :]).flatten(-2)


def sam_rel_bias(q_rows: torch.Tensor, *, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, rows: torch.Tensor,
                 size: Size) -> torch.Tensor:
    """The additive relative-position bias of a SAM global block for the query tokens ``rows`` only.

    ``B[(y, x), (y', x')] = q_(y,x) · R_h[y, y'] + q_(y,x) · R_w[x, x']`` with the tables of :func:`sam_rel_pos`
    (q unscaled), so ``softmax(q·scale·kᵀ + B)`` is the block's attention (what timm's ``samvit`` passes to
    ``scaled_dot_product_attention`` as its mask, there for all H·W rows at once).

    Args:
        q_rows: (B, nh, r, hd) queries of the tokens ``rows``.
        rel_pos_h, rel_pos_w: the block's tables (2H−1, hd) and (2W−1, hd).
        rows: (r,) int64 row-major token indices.
        size: token grid (H, W).

    Returns:
        (B, nh, r, H·W) in ``q_rows``' dtype.
    """
    h, w = size
    rh = sam_rel_pos(h, h, rel_pos_h).to(q_rows.dtype)
    rw = sam_rel_pos(w, w, rel_pos_w).to(q_rows.dtype)
    return _rel_bias(q_rows, rh, rw, rows, size)


def sam_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: Size,
    scale: Optional[float] = None,
    rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Post-softmax attention of a SAM global block with decomposed relative positions, computed explicitly
    (timm's ``samvit`` fuses it into scaled_dot_product_attention and never forms it).

    ``A = softmax(q·scale·kᵀ + B_h + B_w)``, ``B_h[(y, x), (y', x')] = q_(y,x) · R_h[y, y']`` and likewise for
    the width (MViTv2's decomposition, q unscaled in the bias).

    Args:
        q, k: (B, nh, H·W, hd) per-head queries and keys of the block (row-major tokens).
        rel_pos_h, rel_pos_w: the block's tables (2H−1, hd) and (2W−1, hd).
        size: token grid (H, W).
        scale: default hd ** −0.5.
        rows: optional (r,) int64 query indices; only their rows are computed (softmax still over all keys).

    Returns:
        (B, nh, r or H·W, H·W) attention, rows summing to 1.
    """
    h, w = size
    if q.shape[-2] != h * w or k.shape[-2] != h * w:
        raise InvalidInputError(f"q/k have {q.shape[-2]}/{k.shape[-2]} tokens, expected {h}x{w}")
    if rows is None:
        rows = torch.arange(h * w, device=q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qr = q[:, :, rows]  # (B, nh, r, hd)
    rh = sam_rel_pos(h, h, rel_pos_h).to(q.dtype)
    rw = sam_rel_pos(w, w, rel_pos_w).to(q.dtype)
    logits = (qr * scale) @ k.transpose(-2, -1) + _rel_bias(qr, rh, rw, rows, size)
    return logits.softmax(dim=-1)


def crop_valid(attn: torch.Tensor, v: torch.Tensor, size: Size, valid: Size) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the top-left ``valid`` part of SAM's token grid on both attention axes and in the values (the
    reference does not renormalise the cropped rows).

    Args:
        attn: (B, nh, H·W, H·W).
        v: (B, nh, H·W, hd).
        size: (H, W) full grid (64x64).
        valid: (sh, sw).

    Returns:
        ((B, nh, Ns, Ns), (B, nh, Ns, hd)), Ns = sh·sw row-major.
    """
    (h, w), (sh, sw) = size, valid
    b, nh = attn.shape[:2]
    a = attn.reshape(b, nh, h, w, h, w)[:, :, :sh, :sw, :sh, :sw].reshape(b, nh, sh * sw, sh * sw)
    vv = v.reshape(b, nh, h, w, -1)[:, :, :sh, :sw].reshape(b, nh, sh * sw, -1)
    return a, vv


# ------------------------------------------------------------------------------------------------ correlation
def sam_thresholds(cos: torch.Tensor, *, cos_fac: float = 1.2, refine_neg_cos: bool = True,
                   neg_value: float = 0.6, max_value: float = 0.9) -> torch.Tensor:
    """Per-query thresholds ``t_i = cos_fac · mean_{h, j} c_h(i, j)``; without ``refine_neg_cos`` a negative
    ``t_i`` becomes ``neg_value``; then ``t_i = min(t_i, max_value)``. The constants take ``cos``' dtype (the
    reference's fp16 gives 0.6001 and 0.8999).

    Args:
        cos: (B, nh, r, Ns) cosine similarities of SAM's values (r query rows).

    Returns:
        (B, 1, r, 1).
    """
    t = cos_fac * cos.mean(dim=1, keepdim=True).mean(dim=-1, keepdim=True)
    if not refine_neg_cos:
        t = torch.where(t < 0.0, torch.tensor(neg_value, dtype=t.dtype, device=t.device), t)
    return torch.where(t > max_value, torch.tensor(max_value, dtype=t.dtype, device=t.device), t)


def _correlation_rows(vn: torch.Tensor, attn_rows: torch.Tensor, rows: torch.Tensor, **kw) -> torch.Tensor:
    cos = vn[:, :, rows] @ vn.transpose(-2, -1)  # (B, hs, r, Ns)
    t = sam_thresholds(cos, **kw)
    kept = torch.where(cos > t, attn_rows, torch.zeros_like(attn_rows)).mean(dim=1)  # (B, r, Ns)
    return kept / kept.sum(dim=-1, keepdim=True)


def sam_correlation(
    v: torch.Tensor,
    attn: torch.Tensor,
    *,
    cos_fac: float = 1.2,
    refine_neg_cos: bool = True,
    chunk: Optional[int] = None,
) -> torch.Tensor:
    """Trident's correlation matrix from SAM's last global block (reference ``get_sam_sim``).

    ``c_h = v̂_h v̂_hᵀ`` (cosine of the values per SAM head), thresholds :func:`sam_thresholds`,
    ``R = mean_h(c_h > t ? A_h : 0)``, ``W = R / rowsum(R)``. The diagonal is always kept (``c_ii = 1 > t``).
    One matrix serves every CLIP head.

    Args:
        v: (B, hs, Ns, hd) SAM values on the valid grid.
        attn: (B, hs, Ns, Ns) SAM post-softmax attention on the valid grid (:func:`crop_valid`).
        cos_fac, refine_neg_cos: the per-dataset settings.
        chunk: compute this many query rows at a time (bounded memory); None = all at once.

    Returns:
        (B, Ns, Ns) row-stochastic.
    """
    if v.dim() != 4 or attn.dim() != 4 or attn.shape[:3] != v.shape[:3] or attn.shape[-1] != v.shape[2]:
        raise InvalidInputError(f"expected v (B, hs, Ns, hd) and attn (B, hs, Ns, Ns), got {tuple(v.shape)} and "
                                f"{tuple(attn.shape)}")
    ns = v.shape[2]
    vn = F.normalize(v, dim=-1)
    step = ns if chunk is None else _positive("chunk", chunk)
    out = []
    for r0 in range(0, ns, step):
        rows = torch.arange(r0, min(r0 + step, ns), device=v.device)
        out.append(_correlation_rows(vn, attn[:, :, r0:r0 + step], rows, cos_fac=cos_fac,
                                     refine_neg_cos=refine_neg_cos))
    return torch.cat(out, dim=1)


def sam_global_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: Size,
    valid: Size,
    cos_fac: float = 1.2,
    refine_neg_cos: bool = True,
    scale: Optional[float] = None,
    chunk: int = 512,
) -> torch.Tensor:
    """:func:`sam_attention`, :func:`crop_valid` and :func:`sam_correlation` fused, ``chunk`` query rows at a
    time: the (hs, H·W, H·W) attention is never stored (peak ~ 3·B·hs·chunk·H·W values).

    Args:
        q, k, v: (B, hs, H·W, hd) of SAM's last (global) block, row-major over the full (H, W) grid.
        rel_pos_h, rel_pos_w, size, scale: see :func:`sam_attention`.
        valid: (sh, sw) grid covering the picture.
        cos_fac, refine_neg_cos: see :func:`sam_correlation`.

    Returns:
        (B, Ns, Ns), Ns = sh·sw.
    """
    h, w = size
    sh, sw = valid
    if not (0 < sh <= h and 0 < sw <= w):
        raise InvalidInputError(f"valid grid {valid} must lie inside the {size} grid")
    dev = q.device
    keep = (torch.arange(sh, device=dev)[:, None] * w + torch.arange(sw, device=dev)[None, :]).flatten()  # (Ns,)
    vn = F.normalize(v[:, :, keep], dim=-1)  # (B, hs, Ns, hd)
    out = []
    for r0 in range(0, keep.numel(), _positive("chunk", chunk)):
        rows = keep[r0:r0 + chunk]
        a = sam_attention(q, k, rel_pos_h=rel_pos_h, rel_pos_w=rel_pos_w, size=size, scale=scale, rows=rows)
        local = torch.arange(r0, r0 + rows.numel(), device=dev)
        out.append(_correlation_rows(vn, a[..., keep], local, cos_fac=cos_fac, refine_neg_cos=refine_neg_cos))
    return torch.cat(out, dim=1)


# ------------------------------------------------------------------------------------------------ aggregation
def aggregate(weights: torch.Tensor, spliced: torch.Tensor, sam_grid: Size) -> torch.Tensor:
    """Global aggregation on SAM's grid: the spliced map is resized bilinearly to ``sam_grid`` and mixed by W.

    Args:
        weights: (B, Ns, Ns) from :func:`sam_correlation`, Ns = sh·sw.
        spliced: (B, D, gh, gw) spliced window outputs (after ``out_proj``).
        sam_grid: (sh, sw).

    Returns:
        (B, Ns, D) tokens, row-major over (sh, sw) (then ``ln_post`` and ``proj``).
    """
    sh, sw = sam_grid
    if weights.shape[-1] != sh * sw or weights.shape[0] != spliced.shape[0]:
        raise InvalidInputError(f"weights {tuple(weights.shape)} do not match {spliced.shape[0]} maps on a "
                                f"{sam_grid} grid")
    x = spliced
    if tuple(x.shape[-2:]) != (sh, sw):
        x = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False)
    return weights.to(x.dtype) @ x.flatten(2).transpose(1, 2)  # (B, Ns, D)


def aggregate_halves(weights: Sequence[torch.Tensor], spliced: torch.Tensor, sam_grids: Sequence[Size]) -> torch.Tensor:
    """Cityscapes variant: the SAM picture is cut into a left and a right half (at ``Wt // 2``), each with its own
    correlation matrix; the spliced map is cut at ``gw // 2`` and each half aggregated on its own SAM grid; the
    two outputs are placed side by side.

    Args:
        weights: two (B, Ns_k, Ns_k) matrices (left, right).
        spliced: (B, D, gh, gw).
        sam_grids: two (sh, sw_k) grids with the same sh.

    Returns:
        (B, sh·(sw_0 + sw_1), D) tokens, row-major over (sh, sw_0 + sw_1).
    """
    if len(weights) != 2 or len(sam_grids) != 2 or sam_grids[0][0] != sam_grids[1][0]:
        raise InvalidInputError(f"expected two halves with the same SAM grid height, got grids {list(sam_grids)}")
    half = spliced.shape[-1] // 2
    parts = []
    for wk, part, (sh, sw) in zip(weights, (spliced[..., :half], spliced[..., half:]), sam_grids):
        parts.append(aggregate(wk, part, (sh, sw)).unflatten(1, (sh, sw)))  # (B, sh, sw, D)
    return torch.cat(parts, dim=2).flatten(1, 2)


# ------------------------------------------------------------------------------------------------ post-processing
def merge_first_class_synonyms(probs: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The reference's synonym rule: when there are more queries Q than classes C, class 0 takes the max over the
    first ``Q − C + 1`` queries and the other classes keep one query each. Right only when class 0 is the only
    class with synonyms (true for every class file of the reference).

    Args:
        probs: (..., Q, H, W) per-query probabilities.

    Returns:
        (..., C, H, W).
    """
    q = probs.shape[-3]
    if num_classes == q:
        return probs
    if not 0 < num_classes < q:
        raise InvalidInputError(f"num_classes must be in 1..{q} for {q} queries, got {num_classes}")
    n_bg = q - num_classes + 1
    return torch.cat([probs[..., :n_bg, :, :].amax(dim=-3, keepdim=True), probs[..., n_bg:, :, :]], dim=-3)


def postprocess(logits: torch.Tensor, *, num_classes: int, logit_scale: float = 40.0,
                prob_thd: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosine logits -> (labels, class probabilities) as the reference's ``postprocess_result``.

    ``P = softmax(logit_scale · logits)`` over queries, :func:`merge_first_class_synonyms`, argmax (ties to the
    lowest class), pixels whose best probability is below ``prob_thd`` go to class 0.

    Args:
        logits: (..., Q, H, W) cosine logits at full resolution.

    Returns:
        ((..., H, W) int64 labels, (..., C, H, W) probabilities, not renormalised).
    """
    probs = merge_first_class_synonyms(torch.softmax(logits * logit_scale, dim=-3), num_classes)
    best, labels = probs.max(dim=-3)
    labels = torch.where(best < prob_thd, torch.zeros_like(labels), labels)
    return labels, probs


# ------------------------------------------------------------------------------------------------ SAM refinement
def _label_8(mask: torch.Tensor) -> Tuple[torch.Tensor, int]:
    from scipy import ndimage

    lab, n = ndimage.label(mask.cpu().numpy(), structure=[[1, 1, 1], [1, 1, 1], [1, 1, 1]])
    return torch.from_numpy(lab).to(mask.device), int(n)


def coarse_regions(
    labels: torch.Tensor,
    probs: torch.Tensor,
    *,
    coarse_thresh: float,
    min_area: int = 225,
    down: int = 2,
) -> Dict[str, object]:
    """Prompts of the SAM refinement from the coarse result (reference ``split_connected_regions``), per image.

    The label map goes to (H//down, W//down) with nearest sampling, the probabilities bilinearly; pixels whose
    best probability is below ``coarse_thresh`` become unassigned (label C). For every class c < C whose
    down-sampled probability reaches ``coarse_thresh`` somewhere, each 8-connected region of label c with at
    least ``min_area`` pixels (on the down-sampled grid) gives a point (the first maximum of ``P_c`` inside the
    region, as (x, y)) and a box (``masks_to_boxes``: x1, y1, x2, y2 with inclusive maxima), both int64.

    Args:
        labels: (H, W) int64 coarse labels.
        probs: (C, H, W) class probabilities (after the synonym merge).
        coarse_thresh: τ of the configs.
        min_area: minimum region area on the down-sampled grid.
        down: down-sampling factor (2).

    Returns:
        dict with ``probs_down`` (C, dh, dw), ``labels_down`` (dh, dw) and per class c with regions:
        ``regions[c]`` (n, dh, dw) bool, ``points[c]`` (n, 2) int64, ``boxes[c]`` (n, 4) int64.
    """
    c_num, h, w = probs.shape
    dh, dw = h // down, w // down
    lab = F.interpolate(labels[None, None].float(), size=(dh, dw), mode="nearest")[0, 0].long()
    pd = F.interpolate(probs[None].float(), size=(dh, dw), mode="bilinear", align_corners=False)[0]
    lab = torch.where(pd.max(dim=0).values < coarse_thresh, torch.full_like(lab, c_num), lab)
    regions, points, boxes = {}, {}, {}
    for c in range(c_num):
        if pd[c].max() < coarse_thresh:
            continue
        found = class_regions(lab == c, pd[c], min_area=min_area)
        if found is not None:
            regions[c], points[c], boxes[c] = found
    return dict(labels_down=lab, probs_down=pd, regions=regions, points=points, boxes=boxes)


def class_regions(mask: torch.Tensor, prob: torch.Tensor, *, min_area: int = 225
                  ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One class's prompts (the inner step of :func:`coarse_regions`): the 8-connected regions of ``mask`` with at
    least ``min_area`` pixels, each with a point (the first maximum of ``prob`` inside it, as (x, y)) and a box
    (``masks_to_boxes``: x1, y1, x2, y2 with inclusive maxima).

    Args:
        mask: (h, w) bool, the pixels labelled with the class.
        prob: (h, w) the class's probability.

    Returns:
        (regions (n, h, w) bool, points (n, 2) int64, boxes (n, 4) int64), or None without a region.
    """
    h, w = mask.shape
    comp, n = _label_8(mask)
    if n == 0:
        return None
    areas = torch.bincount(comp.flatten(), minlength=n + 1)  # component sizes, without a mask per component
    ids = [i for i in range(1, n + 1) if int(areas[i]) >= min_area]  # in label order, like the reference's loop
    if not ids:
        return None
    m = torch.stack([comp == i for i in ids])  # (n, h, w)
    flat = (prob[None] * m).flatten(1).argmax(dim=1)
    points = torch.stack([flat % w, flat // w], dim=1)  # (x, y)
    ys = torch.arange(h, device=m.device)
    xs = torch.arange(w, device=m.device)
    big = torch.iinfo(torch.long).max
    boxes = torch.stack([
        torch.where(m, xs[None, None, :], big).flatten(1).amin(1),
        torch.where(m, ys[None, :, None], big).flatten(1).amin(1),
        torch.where(m, xs[None, None, :], -1).flatten(1).amax(1),
        torch.where(m, ys[None, :, None], -1).flatten(1).amax(1),
    ], dim=1)
    return m, points, boxes


def prompt_tensors(
    points: torch.Tensor,
    boxes: torch.Tensor,
    prob_down: torch.Tensor,
    *,
    image_size: Size,
    coarse_thresh: float,
    mask_coeff: float = 0.005,
    long_side: int = 1024,
    mask_side: int = 256,
    batched_mask: bool = False,
) -> Dict[str, torch.Tensor]:
    """SAM prompts of one class's n regions (reference ``sam_refinement``).

    Points and boxes live on the down-sampled grid (dh, dw) and are scaled to SAM's input frame with
    ``sam_resize_shape(dh, dw, long_side)`` (x by new_w/dw, y by new_h/dh). The mask prompt is the class's
    down-sampled probability resized bilinearly to ``sam_resize_shape(H0, W0, mask_side)`` of the *original*
    image, zero-padded to ``mask_side``², then ``m ← mask_coeff · m`` where ``m > coarse_thresh``, else 0.

    Args:
        points: (n, 2) int64 (x, y); boxes: (n, 4) int64 (x1, y1, x2, y2), from :func:`coarse_regions`.
        prob_down: (dh, dw) down-sampled probability of the class.
        image_size: original (H0, W0).
        batched_mask: return the mask as (n, 1, S, S) (SAM's documented layout) instead of the reference's
            single (1, S, S), which SAM's prompt encoder then treats as an unbatched image (see
            :func:`mask_downscale`).

    Returns:
        dict ``point_coords`` (n, 1, 2), ``point_labels`` (n, 1) ones, ``boxes`` (n, 4), ``mask_input``; float32.
    """
    dh, dw = prob_down.shape
    nh, nw = sam_resize_shape(dh, dw, long_side)
    sx, sy = nw / dw, nh / dh
    pts = points.float().clone()
    pts[:, 0] *= sx
    pts[:, 1] *= sy
    bx = boxes.float().clone()
    bx[:, 0::2] *= sx
    bx[:, 1::2] *= sy
    mh, mw = sam_resize_shape(image_size[0], image_size[1], mask_side)
    m = F.interpolate(prob_down[None, None].float(), size=(mh, mw), mode="bilinear", align_corners=False)[0]
    m = F.pad(m, (0, mask_side - mw, 0, mask_side - mh))  # (1, S, S)
    m = torch.where(m > coarse_thresh, mask_coeff * m, torch.zeros_like(m))
    if batched_mask:
        m = m[None].expand(points.shape[0], -1, -1, -1)
    return dict(point_coords=pts[:, None], point_labels=torch.ones(points.shape[0], 1), boxes=bx, mask_input=m)


def _layer_norm_dim1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + eps)
    return weight[:, None, None] * x + bias[:, None, None]


def mask_downscale(mask: torch.Tensor, params: Mapping[str, torch.Tensor], *, eps: float = 1e-6) -> torch.Tensor:
    """SAM prompt encoder's ``mask_downscaling`` (conv 2x2/2 -> LayerNorm2d -> GELU -> conv 2x2/2 ->
    LayerNorm2d -> GELU -> conv 1x1) written out, for a batched (n, 1, S, S) or the reference's 3-D (1, S, S) mask.

    With a 3-D mask the convolutions run unbatched, (C, H, W), and SAM's LayerNorm2d, which normalises over
    dimension 1, then normalises over the *height* instead of the channels; ``eps`` matters because the mask
    values are tiny (x 0.005). The result (256, S/4, S/4) is broadcast over the n prompts by the mask decoder.

    Args:
        mask: (n, 1, S, S) or (1, S, S).
        params: the prompt encoder's tensors named as in SAM's state dict without the prefix:
            ``mask_downscaling.{0,1,3,4,6}.{weight,bias}``.

    Returns:
        (n, 256, S/4, S/4) or (256, S/4, S/4).
    """
    if mask.dim() not in (3, 4):
        raise InvalidInputError(f"mask prompt must be (n, 1, S, S) or (1, S, S), got shape {tuple(mask.shape)}")
    p = {k[len("mask_downscaling."):] if k.startswith("mask_downscaling.") else k: t for k, t in params.items()}
    x = F.conv2d(mask, p["0.weight"], p["0.bias"], stride=2)
    x = F.gelu(_layer_norm_dim1(x, p["1.weight"], p["1.bias"], eps))
    x = F.conv2d(x, p["3.weight"], p["3.bias"], stride=2)
    x = F.gelu(_layer_norm_dim1(x, p["4.weight"], p["4.bias"], eps))
    return F.conv2d(x, p["6.weight"], p["6.bias"])


def sam_masks_to_image(
    low_res: torch.Tensor, *, input_size: Size, original_size: Size, image_size: Size, long_side: int = 1024
) -> torch.Tensor:
    """SAM's mask logits to the image: ``postprocess_masks`` (bilinear to long_side², crop the unpadded
    ``input_size``, bilinear to ``original_size``, the picture SAM saw), then bilinear to ``image_size`` when it
    differs (Trident's SAM picture has sides rounded up to the CLIP patch).

    Args:
        low_res: (n, 1, 256, 256) mask logits.

    Returns:
        (n, 1, H0, W0) logits.
    """
    x = F.interpolate(low_res, size=(long_side, long_side), mode="bilinear", align_corners=False)
    x = x[..., :input_size[0], :input_size[1]]
    x = F.interpolate(x, size=tuple(original_size), mode="bilinear", align_corners=False)
    if tuple(x.shape[-2:]) != tuple(image_size):
        x = F.interpolate(x, size=tuple(image_size), mode="bilinear", align_corners=False)
    return x


def refined_class_score(mask_logits: torch.Tensor, prob: torch.Tensor, *, mask_threshold: float = 0.0) -> torch.Tensor:
    """One class's refined score: ``max_k(σ(l_k) · P_c) · [any_k l_k > mask_threshold]``.

    Args:
        mask_logits: (n, H, W) SAM logits of the class's kept regions at full resolution.
        prob: (H, W) the class's coarse probability.

    Returns:
        (H, W).
    """
    score = (mask_logits.sigmoid() * prob).amax(dim=0)
    return score * (mask_logits > mask_threshold).any(dim=0)


def merge_refinement(scores: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """Refined labels: argmax over classes of the refined scores (C, H, W) (zero for classes without kept
    regions; ties to the lowest class), keeping the coarse (H, W) label where all scores are 0."""
    return torch.where(scores.sum(dim=0) == 0, coarse, scores.argmax(dim=0))


def merge_failed_regions(scores: torch.Tensor, failed: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The reference's returned scores where regions failed the IoU filter: ``max(scores, [failed] · P)``.

    The reference then compares ``max_c([failed]·P) > max_c(scores)``, which the element-wise max makes
    impossible, so the labels are unchanged (only these scores differ).

    Args:
        scores: (C, H, W) refined scores; failed: (H, W) bool union of the failed regions (nearest-resized);
        probs: (C, H, W).
    """
    return torch.maximum(scores, failed.to(probs.dtype)[None] * probs)

