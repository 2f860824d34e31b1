"""SegmentationResult: the label map, class probabilities and labels of one image, with pictures."""
from __future__ import annotations

import colorsys
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

__all__ = ["SegmentationResult", "palette"]


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
            raise ValueError(f"unknown label {label!r}; this result has {self.labels}")
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
        font = _font(font_size)
        pad, sw = max(2, font_size // 3), font_size
        texts = [f"{lab}  {share:.1%}" for lab, _, share in entries]
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
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
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
        ``<stem>_probs.npy`` (C, H, W) float32. Returns the written paths by kind."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"labels": out / f"{stem}_labels.png", "overlay": out / f"{stem}_overlay.png"}
        self.label_image().save(paths["labels"])
        self.overlay(alpha, legend=True).save(paths["overlay"])
        if save_probs:
            if self.probs is None:
                from .errors import InvalidInputError

                raise InvalidInputError("this result has no class probabilities: predict with return_probs=True "
                                        "(CLI: --save-probs) to save them")
            paths["probs"] = out / f"{stem}_probs.npy"
            np.save(paths["probs"], self.probs)
        return {k: str(v) for k, v in paths.items()}

    def _repr_png_(self) -> bytes:
        """Jupyter shows the overlay with its legend when a result is the last expression of a cell."""
        import io

        buf = io.BytesIO()
        self.overlay(legend=True).save(buf, format="PNG")
        return buf.getvalue()


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()
