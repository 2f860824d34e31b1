"""SegmentationResult: the label map, class probabilities and labels of one image, with pictures."""
from __future__ import annotations

import colorsys
import functools
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from .errors import InvalidInputError

logger = logging.getLogger(__name__)

__all__ = ["SegmentationResult", "palette", "find_font"]


def _atomic(path: Path, write) -> None:
    """``write(file object)`` to a temporary file next to ``path``, then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def palette(n: int) -> np.ndarray:
    """``n`` distinct, deterministic RGB colours (uint8, (n, 3)): golden-ratio hue steps, alternating brightness."""
    cols = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        s = 0.65 if i % 2 == 0 else 0.9
        v = 0.95 if (i // 2) % 2 == 0 else 0.75
        cols.append([round(c * 255) for c in colorsys.hsv_to_rgb(h, s, v)])
    return np.asarray(cols, dtype=np.uint8).reshape(n, 3)


@dataclass
class SegmentationResult:
    """Prediction for one image, at the input image's size.

    Attributes:
        label_map: (H, W) int32, indices into ``labels``.
        labels: class names (the first synonym of each label).
        score: (H, W) float32, the probability of the chosen label (class probabilities renormalised to sum to 1
            per pixel). A pixel sent to ``labels[0]`` by the threshold keeps the probability of ``labels[0]``.
        probs: (C, H, W) float32 class probabilities (softmax over queries, max over each class's synonyms,
            renormalised to sum to 1 per pixel), only with ``predict(..., return_probs=True)``: they take
            4·C·H·W bytes (100 labels on a 4000x3000 photo: 4.8 GB). The threshold compares the scores *before*
            the renormalisation, so a pixel's ``probs`` can exceed it while the pixel went to ``labels[0]``.
        image: (H, W, 3) uint8 RGB input, for pictures (None if not kept).
        logits: (Q, H, W) float32 raw per-query cosine logits when requested, else None.
        queries: the text queries (synonyms included) behind ``logits``.
    """

    label_map: np.ndarray
    labels: List[str]
    score: Optional[np.ndarray] = field(default=None, repr=False)
    probs: Optional[np.ndarray] = field(default=None, repr=False)
    image: Optional[np.ndarray] = field(default=None, repr=False)
    logits: Optional[np.ndarray] = field(default=None, repr=False)
    queries: Optional[List[str]] = field(default=None, repr=False)

    @property
    def size(self):
        """(H, W)."""
        return tuple(self.label_map.shape)

    def mask(self, label: str) -> np.ndarray:
        """Boolean (H, W) mask of one label."""
        if label not in self.labels:
            raise InvalidInputError(f"unknown label {label!r}; this result has {self.labels}")
        return self.label_map == self.labels.index(label)

    def fractions(self) -> dict:
        """Share of the image's pixels per label."""
        counts = np.bincount(self.label_map.ravel(), minlength=len(self.labels))
        return {lab: float(c) / self.label_map.size for lab, c in zip(self.labels, counts)}

    def color_mask(self) -> np.ndarray:
        """(H, W, 3) uint8 colour image of the label map."""
        return palette(len(self.labels))[self.label_map]

    def legend_entries(self, min_fraction: float = 0.0) -> List[Tuple[str, Tuple[int, int, int], float]]:
        """(label, colour, share) of the labels present, largest share first."""
        cols = palette(len(self.labels))
        shares = self.fractions()
        entries = [(lab, tuple(int(c) for c in cols[i]), shares[lab]) for i, lab in enumerate(self.labels)
                   if shares[lab] > min_fraction]
        return sorted(entries, key=lambda e: -e[2])

    def legend(self, font_size: int = 16):
        """PIL image of the legend: a colour swatch, the label and its share of the image, per label present."""
        from PIL import Image, ImageDraw

        entries = self.legend_entries()
        texts = [f"{lab}  {share:.1%}" for lab, _, share in entries]
        font = _font(font_size, "".join(texts))
        pad, sw = max(2, font_size // 3), font_size
        draw0 = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        tw = max((draw0.textlength(t, font=font) for t in texts), default=0)
        w = int(pad * 3 + sw + tw)
        h = int(pad + len(entries) * (font_size + pad))
        img = Image.new("RGB", (max(w, 1), max(h, 1)), (255, 255, 255))
        d = ImageDraw.Draw(img)
        for i, ((_, col, _), text) in enumerate(zip(entries, texts)):
            y = pad + i * (font_size + pad)
            d.rectangle((pad, y, pad + sw, y + font_size), fill=col, outline=(0, 0, 0))
            d.text((pad * 2 + sw, y), text, fill=(0, 0, 0), font=font)
        return img

    def overlay(self, alpha: float = 0.5, *, legend: bool = False):
        """PIL image at the input's size: the colour mask blended over the input (``alpha`` = mask opacity);
        with ``legend=True`` the legend is drawn in the top-left corner (scaled to the image, clipped if the
        image is too small for all labels)."""
        from PIL import Image

        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise InvalidInputError(f"alpha must be a number in [0, 1], got {alpha!r}")
        colors = self.color_mask().astype(np.float32)
        if self.image is None:
            out = Image.fromarray(colors.astype(np.uint8))
        else:
            blend = (1 - alpha) * self.image.astype(np.float32) + alpha * colors
            out = Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8))
        if legend:
            h, w = self.label_map.shape
            panel = self.legend(font_size=int(min(max(h / 28, 10), 40)))
            panel = panel.crop((0, 0, min(panel.width, w), min(panel.height, h)))
            out.paste(panel, (0, 0))
        return out

    def label_image(self):
        """The label map as a palette PNG-ready PIL image (mode ``P``; 16-bit ``I;16`` beyond 256 labels)."""
        from PIL import Image

        if len(self.labels) <= 256:
            img = Image.fromarray(self.label_map.astype(np.uint8), mode="P")
            pal = palette(len(self.labels))
            img.putpalette(pal.ravel().tolist() + [0] * (768 - pal.size))
            return img
        return Image.fromarray(self.label_map.astype(np.uint16))

    def save(self, directory: Union[str, os.PathLike], stem: str = "image", *, save_probs: bool = False,
             alpha: float = 0.5) -> Dict[str, str]:
        """Write ``<stem>_labels.png`` (palette), ``<stem>_overlay.png`` (with legend) and, with ``save_probs``,
        ``<stem>_probs.npy`` (C, H, W) float32. Each file is written under a temporary name and renamed, so an
        interrupted run never leaves a half-written file. Returns the written paths by kind."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"labels": out / f"{stem}_labels.png", "overlay": out / f"{stem}_overlay.png"}
        _atomic(paths["labels"], lambda f: self.label_image().save(f, format="PNG"))
        _atomic(paths["overlay"], lambda f: self.overlay(alpha, legend=True).save(f, format="PNG"))
        if save_probs:
            if self.probs is None:
                raise InvalidInputError("this result has no class probabilities: predict with return_probs=True "
                                        "(CLI: --save-probs) to save them")
            paths["probs"] = out / f"{stem}_probs.npy"
            _atomic(paths["probs"], lambda f: np.save(f, self.probs))
        return {k: str(v) for k, v in paths.items()}

    def _repr_png_(self) -> bytes:
        """Jupyter shows the overlay with its legend when a result is the last expression of a cell."""
        import io

        buf = io.BytesIO()
        self.overlay(legend=True).save(buf, format="PNG")
        return buf.getvalue()


FONT_ENV = "OVSEG_FONT"


def _default_font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _missing_chars(font, text: str) -> str:
    """Characters of ``text`` that ``font`` draws as its missing-glyph box (compared bitmap to bitmap)."""
    def bitmap(ch):
        m = font.getmask(ch)
        return m.size, bytes(m)

    notdef = bitmap("\U0010fffd")  # a private-use code point no font maps: its bitmap is the .notdef glyph
    return "".join(ch for ch in dict.fromkeys(text) if not ch.isspace() and bitmap(ch) == notdef)


def _packaged_font() -> Optional[str]:
    """Noto Sans CJK from the optional ``ovseg[fonts]`` extra (package ``noto-cjk-sans-jp-regular``)."""
    try:
        import noto_cjk_sans_jp_regular as pkg
    except ImportError:
        return None
    path = str(pkg.FONT_PATH)
    return path if os.path.isfile(path) else None


@functools.lru_cache(maxsize=64)
def _fontconfig_fonts(chars: str) -> Tuple[str, ...]:
    """System font files containing every character of ``chars`` (fontconfig's ``fc-list``), sans first."""
    exe = shutil.which("fc-list")
    if exe is None or not chars:
        return ()
    charset = " ".join(f"{ord(c):x}" for c in chars)
    try:
        out = subprocess.run([exe, f":charset={charset}", "file"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    def plainness(f: str):  # regular sans-serif faces first
        name = os.path.basename(f)
        return (any(w in name for w in ("Bold", "Italic", "Oblique", "Light", "Mono", "Condensed")),
                "Sans" not in name, name)

    return tuple(sorted({ln.strip().rstrip(":") for ln in out.splitlines() if ln.strip()}, key=plainness))


def find_font(text: str) -> Optional[str]:
    """Path of a font that draws every character of ``text``, or None when Pillow's default font does.

    Order: the file named by the ``OVSEG_FONT`` environment variable; Pillow's built-in font (Latin letters
    without accents); Noto Sans CJK from ``pip install "ovseg[fonts]"`` (Latin with accents, Greek, Cyrillic,
    Chinese, Japanese, Korean); any system font fontconfig finds for the characters. If none covers the
    text, the best of these is used (missing characters show as boxes) and a warning names the fix.
    """
    return _choose_font(text, os.environ.get(FONT_ENV))[0]


@functools.lru_cache(maxsize=256)
def _choose_font(text: str, env: Optional[str]) -> Tuple[Optional[str], str]:
    from PIL import ImageFont

    size = 16
    candidates: List[Optional[str]] = [env] if env else []
    candidates += [None, _packaged_font()]
    best: Tuple[Optional[str], str] = (None, _missing_chars(_default_font(size), text))
    tried = set()
    for path in candidates:
        if path in tried or (path is not None and not os.path.isfile(path)):
            continue
        tried.add(path)
        font = _default_font(size) if path is None else ImageFont.truetype(path, size)
        missing = _missing_chars(font, text)
        if not missing:
            return path, ""
        if len(missing) < len(best[1]):
            best = (path, missing)
    for path in _fontconfig_fonts(best[1]):
        try:
            missing = _missing_chars(ImageFont.truetype(path, size), text)
        except OSError:
            continue
        if not missing:
            return path, ""
        if len(missing) < len(best[1]):
            best = (path, missing)
    logger.warning("no font found that draws %r (they show as boxes); pip install \"ovseg[fonts]\" or set %s to "
                   "a .ttf/.otf file that has them", best[1], FONT_ENV)
    return best


def _font(size: int, text: str = ""):
    """A font of ``size`` pixels that draws ``text`` (see :func:`find_font`)."""
    path = find_font(text)
    return _default_font(size) if path is None else _truetype(path, size)


@functools.lru_cache(maxsize=16)
def _truetype(path: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size)
