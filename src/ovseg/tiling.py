"""Row-band post-processing so that memory does not grow with the input size beyond the outputs themselves.

The window-averaged logits live at the resized image's resolution (a 336 short side); everything at the
input's full resolution (bilinear resize, PAMR, softmax, argmax) is done one band of rows at a time.
``resize_rows`` reproduces ``F.interpolate(mode="bilinear", align_corners=False)`` for any row range, and
PAMR is exact per band when each band carries ``steps · max(dilations)`` halo rows (a pixel's result depends
only on image/mask values within that distance; beyond the image border replicate padding is the true rule).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .errors import InvalidInputError
from .pamr import pamr

__all__ = ["resize_rows", "resize_rows_from", "row_bands", "pamr_rows"]


def _src_index(out_len: int, in_len: int, start: int, stop: int, device) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """PyTorch's bilinear source indices/weights (align_corners False) for output positions [start, stop)."""
    scale = torch.tensor(in_len / out_len, dtype=torch.float32)  # float32 arithmetic, as PyTorch's CPU kernel
    dst = torch.arange(start, stop, device=device, dtype=torch.float32)
    src = (scale * (dst + 0.5) - 0.5).clamp_min(0.0)
    i0 = src.long().clamp_max(in_len - 1)
    i1 = torch.where(i0 < in_len - 1, i0 + 1, i0)
    lam = (src - i0.float()).clamp(0.0, 1.0)
    return i0, i1, lam


def resize_rows(x: torch.Tensor, size: Tuple[int, int], start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of ``F.interpolate(x[None], size, mode='bilinear', align_corners=False)[0]``.

    x: (C, h, w) -> (C, stop - start, W), float32. Bilinear interpolation is separable: the rows are interpolated
    here with PyTorch's source-index rule, the columns by ``F.interpolate(mode='linear')`` (the same rule).
    """
    return resize_rows_from(lambda r0, r1: x[:, r0:r1], tuple(x.shape[-2:]), size, start, stop, device=x.device)


def resize_rows_from(
    fetch: Callable[[int, int], torch.Tensor],
    in_size: Tuple[int, int],
    size: Tuple[int, int],
    start: int,
    stop: int,
    *,
    device=None,
) -> torch.Tensor:
    """:func:`resize_rows` of a map that is only available band by band (e.g. computed on demand).

    Args:
        fetch: ``fetch(r0, r1)`` returns rows [r0, r1) of the source map, (C, r1 - r0, w).
        in_size: the source map's (h, w).
        size: the output (H, W); larger or smaller than ``in_size``.
        start, stop: the output rows wanted.

    Returns:
        (C, stop - start, W) float32, equal to rows [start, stop) of the bilinear resize (align_corners False, no
        antialias) of the whole source.
    """
    h_out, w_out = size
    h, w = in_size
    y0, y1, ly = _src_index(h_out, h, start, stop, device)
    lo, hi = int(y0.min()), int(y1.max()) + 1
    band = fetch(lo, hi).float()  # (C, hi - lo, w)
    if tuple(band.shape[-2:]) != (hi - lo, w):
        raise InvalidInputError(f"fetch({lo}, {hi}) returned shape {tuple(band.shape)}, expected (C, {hi - lo}, {w})")
    ly = ly.to(band.device).view(1, -1, 1)
    rows = band[:, (y0 - lo).to(band.device)] * (1 - ly) + band[:, (y1 - lo).to(band.device)] * ly  # (C, n, w)
    if w == w_out:
        return rows
    return F.interpolate(rows, size=w_out, mode="linear", align_corners=False)  # (C, n, W)


def row_bands(height: int, width: int, max_pixels: int = 1 << 21, min_rows: int = 32) -> Iterator[Tuple[int, int]]:
    """Consecutive row ranges of at most ``max_pixels`` pixels (and at least ``min_rows`` rows)."""
    rows = max(min_rows, max_pixels // max(width, 1))
    for r0 in range(0, height, rows):
        yield r0, min(height, r0 + rows)


def pamr_rows(
    image: torch.Tensor,
    logits: torch.Tensor,
    size: Tuple[int, int],
    start: int,
    stop: int,
    *,
    steps: int,
    dilations: Sequence[int],
    halo: Optional[int] = None,
) -> torch.Tensor:
    """Rows [start, stop) of ``pamr(resize(image), resize(logits))`` at ``size``, computed on a haloed band.

    image: (3, h, w) and logits (Q, h', w') at any resolution; both are resized bilinearly to ``size`` first.
    """
    h_out = size[0]
    halo = steps * max(dilations) if halo is None else halo
    e0, e1 = max(0, start - halo), min(h_out, stop + halo)
    img = resize_rows(image, size, e0, e1)[None]
    lg = resize_rows(logits, size, e0, e1)[None]
    out = pamr(img, lg, steps=steps, dilations=dilations)[0]
    return out[:, start - e0:stop - e0]
