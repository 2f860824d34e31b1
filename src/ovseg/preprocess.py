"""Input handling: images of every common kind -> RGB uint8/float, reference resize (mmcv ``Resize`` with
``keep_ratio``, docs/methods.md, "Input and resize") and CLIP normalisation."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .config import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD
from .errors import InvalidInputError, InvalidTypeError, PathNotFoundError

__all__ = ["load_image", "rescale_size", "resize_image", "normalize_clip", "is_batch"]

_PIL_LIMIT_LOCK = threading.Lock()


def _pil_to_rgb_array(img) -> np.ndarray:
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if arr.max() > 255 or img.mode.startswith("I;16") else 255.0
        arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.round(arr * (255.0 if arr.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return np.array(img.convert("RGB"), dtype=np.uint8)  # writable copy


def _open_file(path: Path, source: Any, max_pixels: Optional[int]) -> np.ndarray:
    """Decode an image file to RGB uint8, with Pillow's decompression-bomb limit or ``max_pixels``."""
    from PIL import Image, UnidentifiedImageError

    try:
        if max_pixels is None:  # Pillow's own limit (Image.MAX_IMAGE_PIXELS, as the user may have set it)
            with Image.open(path) as img:
                img.load()
                return _pil_to_rgb_array(img)
        # an explicit limit replaces Pillow's for this file only: its global is switched off while the header
        # is read (under a lock, restored at once) and the size checked here
        with _PIL_LIMIT_LOCK:
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                img = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        with img:
            w, h = img.size
            if w * h > max_pixels:
                raise InvalidInputError(f"'{source}' has {w * h:,} pixels ({w}x{h}), more than max_pixels="
                                        f"{max_pixels:,} (CLI: --max-pixels)")
            img.load()
            return _pil_to_rgb_array(img)
    except Image.DecompressionBombError:
        size = _header_size(path)
        limit = 2 * Image.MAX_IMAGE_PIXELS
        what = f" ({size[0]}x{size[1]} = {size[0] * size[1]:,} pixels)" if size else ""
        raise InvalidInputError(
            f"'{source}' is larger than Pillow's decompression-bomb limit of {limit:,} pixels{what}; if you trust "
            f"the file, allow it with --max-pixels N (Python: ovseg.preprocess.load_image(path, max_pixels=N))"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InvalidInputError(f"'{source}' is not a readable image ({type(e).__name__}: {e})") from None


def _header_size(path: Path) -> Optional[Tuple[int, int]]:
    """(width, height) from an image header without decoding it (Pillow's limit switched off briefly)."""
    from PIL import Image

    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(path) as img:
                return img.size
        except Exception:
            return None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def load_image(source: Any, *, max_pixels: Optional[int] = None) -> Union[np.ndarray, torch.Tensor]:
    """Read one image as RGB: uint8 (H, W, 3) numpy for files/PIL/arrays, float (3, H, W) in [0, 1] for tensors.

    Paths and PIL images get EXIF orientation applied; grayscale, palette, RGBA (over white), CMYK and
    16-bit images are converted to 8-bit RGB.

    Args:
        source: a path, a PIL image, a uint8 numpy array (H, W[, 3|4]) or a tensor (1|3, H, W).
        max_pixels: for files, the largest width x height accepted. Default: Pillow's decompression-bomb
            protection (an error above ``2 * PIL.Image.MAX_IMAGE_PIXELS``, about 179 megapixels). Give a number
            to read larger files you trust; Pillow's global setting is not changed.
    """
    from PIL import Image

    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                   or max_pixels < 1):
        raise InvalidInputError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.path.expanduser(str(source)))
        if not path.is_file():
            raise PathNotFoundError(f"image file not found: '{source}'")
        return _open_file(path, source, max_pixels)
    if isinstance(source, Image.Image):
        return _pil_to_rgb_array(source)
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise InvalidInputError(f"numpy images must be (H, W), (H, W, 3) or (H, W, 4), got shape {source.shape}")
        if arr.dtype != np.uint8:
            raise InvalidTypeError(f"numpy images must be uint8 (0-255), got dtype {arr.dtype}; "
                            "convert or pass a float tensor")
        return np.ascontiguousarray(arr[..., :3])
    if isinstance(source, torch.Tensor):
        t = source
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise InvalidInputError(f"tensor images must be (3, H, W) or (1, H, W), got shape {tuple(source.shape)}")
        if not t.is_floating_point():
            if t.dtype != torch.uint8:
                raise InvalidTypeError(f"tensor images must be float in [0, 1] or uint8, got dtype {t.dtype}")
            t = t.float() / 255.0
        if not torch.isfinite(t).all():
            raise InvalidInputError("tensor image contains NaN or inf values")
        lo, hi = float(t.min()), float(t.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise InvalidInputError(f"float tensor images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
        t = t.float().clamp(0, 1)
        return t.expand(3, -1, -1) if t.shape[0] == 1 else t
    raise InvalidTypeError(
        f"unsupported image type {type(source).__name__}; pass a path, a PIL image, a uint8 numpy array "
        "(H, W, 3) or a float tensor (3, H, W) in [0, 1]"
    )


def is_batch(images: Any) -> bool:
    """A list/tuple of images or a 4-D tensor is a batch."""
    return isinstance(images, (list, tuple)) or (isinstance(images, torch.Tensor) and images.dim() == 4)


def rescale_size(height: int, width: int, short_side: int, long_max: int = 2048) -> Tuple[int, int]:
    """mmcv ``rescale_size`` for ``Resize(scale=(long_max, short_side), keep_ratio=True)``: round half up."""
    scale = min(long_max / max(height, width), short_side / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_image(img: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (3, H, W) image, half-pixel centres, no antialias (cv2 INTER_LINEAR's geometry).

    uint8 images are resized in PyTorch's fixed-point uint8 path, so the result is re-quantised like mmcv's
    resize of uint8 images (within ±1 grey level of cv2) and no full-size float copy is made.
    """
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=False)[0]


def normalize_clip(img255: torch.Tensor) -> torch.Tensor:
    """(3, H, W) on 0-255 -> CLIP-normalised with the references' constants."""
    mean = torch.tensor(CLIP_PIXEL_MEAN, device=img255.device).view(3, 1, 1)
    std = torch.tensor(CLIP_PIXEL_STD, device=img255.device).view(3, 1, 1)
    return (img255 - mean) / std
