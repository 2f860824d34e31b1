"""Row-band post-processing so that memory does not grow with the input size beyond the outputs themselves.

The window-averaged logits live at the resized image's resolution (a 336 short side); everything at the
input's full resolution (bilinear resize, PAMR, softmax, argmax) is done one band of rows at a time.
``resize_rows`` reproduces ``F.interpolate(mode="bilinear", align_corners=False)`` for any row range, and
PAMR is exact per band when each band carries ``steps · max(dilations)`` halo rows (a pixel's result depends
only on image/mask values within that distance; beyond the image border replicate padding is the true rule).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .pamr import pamr

__all__ = ["resize_rows", "row_bands", "pamr_rows"]


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
    h_out, w_out = size
    c, h, w = x.shape
    x = x.float()
    y0, y1, ly = _src_index(h_out, h, start, stop, x.device)
    ly = ly.view(1, -1, 1)
    rows = x[:, y0] * (1 - ly) + x[:, y1] * ly  # (C, n, w)
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
