"""Region masks supplied by the user: label images, lists of boolean masks, SAM annotations, files.

Whatever the form, the result is one (H, W) int64 *region map*: equal values form one region, and the smallest
value of the map means "covered by no mask" (0 when masks are painted). A list of boolean masks is painted as
CorrCLIP paints the masks of its generators: in ascending order of area (a stable sort), with ids 1, 2, ..., so
where masks overlap the larger mask wins (docs/masks.md).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import InvalidInputError, InvalidTypeError, PathNotFoundError

__all__ = [
    "as_region_map", "paint_by_area", "load_region_map", "find_mask_file", "MASK_FILE_SUFFIXES",
    "REGION_MASK_FOLDERS", "mask_folder_for",
]

MASK_FILE_SUFFIXES = (".npz", ".npy", ".png", ".tif", ".tiff")
MAX_REGION_ID = (1 << 24) - 1  # region ids are resized through float32 (exact below 2**24)

# Sub-folders of CorrCLIP's published pre-generated masks (region_masks/<folder>/<image stem>.npz) per benchmark
REGION_MASK_FOLDERS: Dict[str, str] = {
    "voc21": "voc", "voc20": "voc", "context60": "context", "context59": "context", "cityscapes": "city",
    "ade20k": "ade", "coco_stuff": "coco", "coco_object": "coco",
}


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(value, Image.Image):
        if value.mode not in ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N"):
            raise InvalidInputError(f"a mask image must be a single-channel label image (PIL mode L, P, I or I;16), "
                                    f"got mode {value.mode}; colour-coded masks are ambiguous, convert them to ids")
        return np.asarray(value)
    return np.asarray(value)


def paint_by_area(masks: Sequence[Any], size: Tuple[int, int], areas: Optional[Sequence[float]] = None
                  ) -> torch.Tensor:
    """Paint boolean masks into one region map, smallest area first, ids 1..K (0 = no mask).

    This is how CorrCLIP turns SAM's automatic masks into a region map (a stable sort by area, so equal areas keep
    their order; a larger mask overwrites a smaller one where they overlap).

    Args:
        masks: K boolean (H, W) arrays or tensors.
        size: (H, W).
        areas: the sort keys (default: each mask's pixel count), e.g. SAM's ``"area"`` field.

    Returns:
        (H, W) int64.
    """
    out = torch.zeros(tuple(size), dtype=torch.int64)
    arrays = []
    for i, m in enumerate(masks):
        a = _as_numpy(m)
        if a.shape != tuple(size):
            raise InvalidInputError(f"mask {i} has shape {a.shape}, expected (H, W) = {tuple(size)}")
        if a.dtype != np.bool_:
            if not np.issubdtype(a.dtype, np.integer) or not np.isin(a, (0, 1)).all():
                raise InvalidInputError(f"mask {i} must be boolean (or 0/1), got dtype {a.dtype}")
            a = a.astype(bool)
        arrays.append(a)
    keys = [float(a.sum()) for a in arrays] if areas is None else [float(v) for v in areas]
    if len(keys) != len(arrays):
        raise InvalidInputError(f"got {len(keys)} areas for {len(arrays)} masks")
    order = sorted(range(len(arrays)), key=lambda i: keys[i])  # Python's sort is stable
    for rank, i in enumerate(order):
        out[torch.from_numpy(arrays[i])] = rank + 1
    return out


def _is_mask_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def as_region_map(masks: Any, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """User-supplied masks -> an (H, W) int64 region map on the CPU.

    Accepted forms:

    - an integer label image (H, W) (numpy, torch, a single-channel PIL image): used as is; its smallest value
      means "no mask";
    - boolean masks: a (K, H, W) array, a list of (H, W) arrays, or one (H, W) boolean array; painted with
      :func:`paint_by_area`;
    - the output of SAM's / SAM 2's automatic mask generator (a list of dicts with ``"segmentation"`` and
      ``"area"``), painted the same way;
    - an empty list (no masks: every pixel unsegmented; needs ``size``);
    - a path to a mask file (:func:`load_region_map`).

    Args:
        masks: see above.
        size: the image's (H, W); a map of another size is an error.

    Raises:
        InvalidInputError: float values, a shape that is not the image's, ids beyond ±(2**24 − 1).
        InvalidTypeError: an unsupported type.
    """
    if masks is None:
        raise InvalidTypeError("masks is None; give a label image (H, W) or a list of boolean masks")
    if isinstance(masks, (str, os.PathLike)):
        return _checked(load_region_map(masks), size)
    if _is_mask_list(masks):
        if len(masks) == 0:
            if size is None:
                raise InvalidInputError("an empty list of masks needs the image size")
            return torch.zeros(tuple(size), dtype=torch.int64)
        if all(isinstance(m, dict) for m in masks):
            if not all("segmentation" in m for m in masks):
                raise InvalidInputError("mask dicts must hold 'segmentation' (SAM's automatic-mask format)")
            segs = [m["segmentation"] for m in masks]
            if any(isinstance(s, dict) for s in segs):
                raise InvalidInputError("RLE-encoded masks are not supported; use output_mode='binary_mask'")
            first = _as_numpy(segs[0])
            areas = [m.get("area") for m in masks]
            return _checked(paint_by_area(segs, size or first.shape, None if None in areas else areas), size)
        first = _as_numpy(masks[0])
        if first.ndim == 2:
            return _checked(paint_by_area(masks, size or first.shape), size)
        arr = _as_numpy(masks)
    else:
        arr = _as_numpy(masks)
    if arr.dtype == object or not (arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.number)):
        raise InvalidTypeError(f"masks must be a label image or boolean masks, got {type(masks).__name__}")
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and size is not None and tuple(arr.shape[:2]) == tuple(size):
        raise InvalidInputError(f"masks of shape {arr.shape} look like an (H, W, C) image; give an (H, W) label "
                                "image of region ids or (K, H, W) boolean masks")
    if arr.ndim == 3:
        return _checked(paint_by_area(list(arr), size or arr.shape[1:]), size)
    if arr.ndim != 2:
        raise InvalidInputError(f"masks must be an (H, W) label image or (K, H, W) boolean masks, got shape "
                                f"{arr.shape}")
    if arr.dtype != np.bool_ and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInputError(f"a label image must hold integer region ids, got dtype {arr.dtype}")
    out = np.ascontiguousarray(arr, dtype=np.int64)  # no copy for a contiguous int64 array
    if not out.flags.writeable:
        out = out.copy()
    return _checked(torch.from_numpy(out), size)


def _checked(regions: torch.Tensor, size: Optional[Tuple[int, int]]) -> torch.Tensor:
    if size is not None and tuple(regions.shape) != tuple(size):
        raise InvalidInputError(f"masks must be an (H, W) = {tuple(size)} label image for this image, got shape "
                                f"{tuple(regions.shape)}")
    if regions.numel() and int(regions.abs().max()) > MAX_REGION_ID:
        raise InvalidInputError(f"region ids must lie within ±{MAX_REGION_ID}, got {int(regions.abs().max())}; "
                                "renumber the regions (only equality and the smallest id matter)")
    return regions


# ---------------------------------------------------------------------------------------------- files
def load_region_map(path: Union[str, os.PathLike]) -> torch.Tensor:
    """Read a region map file: ``.npz`` (the array ``instance_mask``, CorrCLIP's layout, or the only array),
    ``.npy``, or a single-channel label image (``.png``, ``.tif``). Returns (H, W) int64."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise PathNotFoundError(f"mask file not found: '{path}'")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as data:
                keys = list(data.keys())
                if "instance_mask" in keys:
                    arr = data["instance_mask"]
                elif len(keys) == 1:
                    arr = data[keys[0]]
                else:
                    raise InvalidInputError(f"it holds arrays {keys}; expected 'instance_mask' or a single array")
        elif suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(p) as img:
                img.load()
                arr = _as_numpy(img)
        return as_region_map(arr)
    except (InvalidInputError, InvalidTypeError) as e:
        raise InvalidInputError(f"mask file '{path}': {e}") from None
    except (OSError, ValueError) as e:  # unreadable, truncated or pickled content
        raise InvalidInputError(f"mask file '{path}' could not be read ({type(e).__name__}: {e})") from None


def find_mask_file(folder: Union[str, os.PathLike], stem: str, suffixes: Iterable[str] = MASK_FILE_SUFFIXES
                   ) -> Path:
    """``folder/<stem><suffix>`` for the first suffix that exists (``.npz``, ``.npy``, ``.png``, ``.tif``)."""
    folder = Path(os.path.expanduser(str(folder)))
    tried: List[str] = []
    for suffix in suffixes:
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
        tried.append(p.name)
    raise PathNotFoundError(f"no mask file for image '{stem}' in '{folder}' (looked for {', '.join(tried)})")


def mask_folder_for(root: Union[str, os.PathLike], dataset: str) -> Path:
    """The folder of a benchmark's masks under ``root``: ``root/<dataset>``, else CorrCLIP's published layout
    ``root/<voc|context|city|ade|coco>``, else ``root`` itself."""
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise PathNotFoundError(f"--masks: folder not found: '{root}'")
    for name in (dataset, REGION_MASK_FOLDERS.get(dataset)):
        if name and (root / name).is_dir():
            return root / name
    return root
