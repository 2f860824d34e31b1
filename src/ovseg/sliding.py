"""Sliding-window inference with mmseg's crop grid (docs/methods.md, "Sliding windows") and ProxyCLIP's pad-to-multiple.

Windows are cut from every image, grouped by size and run through the model in batches; per-window logits are
upsampled to the (padded) window, the padding is cut away, and logits are averaged per pixel over overlaps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .errors import InvalidInputError, InvalidTypeError

__all__ = ["window_grid", "pad_amounts", "slide_inference", "as_pair", "WindowBatch"]

Pair = Tuple[int, int]


def as_pair(value: Union[int, Sequence[int], None], name: str) -> Optional[Pair]:
    """``336`` -> (336, 336); ``(h, w)`` kept; None kept. Non-positive or non-integer values raise."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidTypeError(f"{name} must be an int or a (height, width) pair, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                       for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise InvalidTypeError(f"{name} must be an int or a (height, width) pair of ints, got {value!r}")
    if pair[0] <= 0 or pair[1] <= 0:
        raise InvalidInputError(f"{name} must be positive, got {value!r}")
    return pair


def window_grid(height: int, width: int, window: Pair, stride: Pair) -> List[Tuple[int, int, int, int]]:
    """mmseg ``slide_inference`` windows as (y1, y2, x1, x2); the last row/column is shifted back to the border."""
    hc, wc = window
    hs, ws = stride
    h_grids = max(height - hc + hs - 1, 0) // hs + 1
    w_grids = max(width - wc + ws - 1, 0) // ws + 1
    boxes = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * hs, wi * ws
            y2, x2 = min(y1 + hc, height), min(x1 + wc, width)
            y1, x1 = max(y2 - hc, 0), max(x2 - wc, 0)
            boxes.append((y1, y2, x1, x2))
    return boxes


def pad_amounts(height: int, width: int, multiple: Optional[int]) -> Tuple[int, int, int, int]:
    """ProxyCLIP's ``compute_padsize``: (left, right, top, bottom) zero padding up to a multiple, split evenly
    with the extra pixel on the right/bottom."""
    if not multiple:
        return 0, 0, 0, 0
    pw = (multiple - width % multiple) % multiple
    ph = (multiple - height % multiple) % multiple
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


@dataclass
class WindowBatch:
    """Where the windows of one forward call come from.

    Attributes:
        image_index: for each window, the index of its image in ``images``.
        boxes: for each window, its (y1, y2, x1, x2) box in its image (before padding).
        pad: (left, right, top, bottom) padding applied to every window of the batch.
        aux: per-window crops of the auxiliary maps, (N, C, h + top + bottom, w + left + right) each.
    """

    image_index: List[int]
    boxes: List[Tuple[int, int, int, int]]
    pad: Tuple[int, int, int, int] = (0, 0, 0, 0)
    aux: Dict[str, torch.Tensor] = field(default_factory=dict)


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def slide_inference(
    images: Sequence[torch.Tensor],
    forward_fn: Callable[..., torch.Tensor],
    *,
    window: Optional[Pair],
    stride: Optional[Pair],
    pad_multiple: Optional[int] = None,
    batch_size: Union[int, Callable[[int, int], int]] = 8,
    progress: Optional[Callable[[int], None]] = None,
    aux: Optional[Sequence[Mapping[str, Tuple[torch.Tensor, float]]]] = None,
    with_context: bool = False,
    native: bool = False,
    group_keys: Optional[Sequence[Hashable]] = None,
) -> List[torch.Tensor]:
    """Average window logits over each image.

    Args:
        images: list of (3, H, W) tensors (sizes may differ), already normalised.
        forward_fn: (N, 3, h, w) windows of equal size -> (N, Q, h', w') logits on any grid; they are
            upsampled bilinearly (align_corners False) to the padded window size. With ``with_context=True`` it is
            called as ``forward_fn(crops, batch)`` with a :class:`WindowBatch`.
        window: (h, w) crop size, or None for whole-image inference (one window per image).
        stride: (h, w) step between windows (ignored in whole-image mode).
        pad_multiple: zero-pad each window to a multiple of this (ProxyCLIP: 56), cut away after.
        batch_size: windows per forward call, or a function of the padded window (height, width) giving it.
        progress: called with the number of windows finished after each batch.
        aux: per image, maps cut into windows alongside it: ``{name: ((C, H, W) tensor, pad value)}``.
        with_context: pass a :class:`WindowBatch` as the second argument of ``forward_fn``.
        native: whole-image mode only: keep each image's logits on the grid ``forward_fn`` returns them on (no
            resize to the image; the caller resizes them later). Padding is refused then.
        group_keys: per image, a key; windows are only batched with windows of images with the same key (and
            the same window size).

    Returns:
        list of (Q, H, W) float32 logits, one per image ((Q, h', w') on the model's grid with ``native``).
    """
    size_of = batch_size if callable(batch_size) else (lambda h, w: batch_size)
    if native and window is not None:
        raise InvalidInputError("native logits need whole-image inference (window=None)")
    if group_keys is not None and len(group_keys) != len(images):
        raise InvalidInputError(f"got {len(group_keys)} group keys for {len(images)} images")
    jobs = []  # (image index, box)
    for i, img in enumerate(images):
        if img.dim() != 3:
            raise InvalidInputError(f"images must be (3, H, W), got {tuple(img.shape)}")
        h, w = img.shape[-2:]
        boxes = [(0, h, 0, w)] if window is None else window_grid(h, w, window, stride or window)
        jobs.extend((i, b) for b in boxes)
    groups = {}
    for job in jobs:
        i, (y1, y2, x1, x2) = job
        key = None if group_keys is None else group_keys[i]
        groups.setdefault((y2 - y1, x2 - x1, key), []).append(job)

    preds: List[Optional[torch.Tensor]] = [None] * len(images)
    counts = [torch.zeros(img.shape[-2:], device=img.device) for img in images]
    for (h, w, _), group in groups.items():
        left, right, top, bottom = pad_amounts(h, w, pad_multiple)
        if native and (left or right or top or bottom):
            raise InvalidInputError(f"native logits cannot be combined with padding to a multiple of "
                                    f"{pad_multiple}; use pad_multiple=0")
        bs = int(size_of(h + top + bottom, w + left + right))
        if bs < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {bs}")
        for batch in _batches(group, bs):
            crops = torch.stack([images[i][:, y1:y2, x1:x2] for i, (y1, y2, x1, x2) in batch])
            padded = bool(left or right or top or bottom)
            if padded:
                crops = F.pad(crops, (left, right, top, bottom))  # zero = CLIP mean colour
            if with_context:
                info = WindowBatch([i for i, _ in batch], [b for _, b in batch], (left, right, top, bottom))
                for key in (aux[batch[0][0]] if aux else {}):
                    maps = torch.stack([aux[i][key][0][..., y1:y2, x1:x2] for i, (y1, y2, x1, x2) in batch])
                    if padded:
                        maps = F.pad(maps, (left, right, top, bottom), value=float(aux[batch[0][0]][key][1]))
                    info.aux[key] = maps
                logits = forward_fn(crops, info)
            else:
                logits = forward_fn(crops)
            for n, (i, (y1, y2, x1, x2)) in enumerate(batch):
                if native:  # the image's logits on the model's own grid; one window per image
                    preds[i] = logits[n].float()
                    counts[i] = None
                    continue
                win = F.interpolate(logits[n:n + 1].float(), size=crops.shape[-2:], mode="bilinear",
                                    align_corners=False)[0, :, top:top + h, left:left + w]
                if preds[i] is None:
                    preds[i] = win.new_zeros((win.shape[0],) + tuple(images[i].shape[-2:]))
                preds[i][:, y1:y2, x1:x2] += win
                counts[i][y1:y2, x1:x2] += 1
            if progress is not None:
                progress(len(batch))
    return [p if c is None else p / c for p, c in zip(preds, counts)]
