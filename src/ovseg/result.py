"""SegmentationResult: the label map, class probabilities and labels of one image, with pictures."""
from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from typing import List, Optional

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
        probs: (C, H, W) float32 class probabilities (softmax over queries, max over each class's synonyms,
            renormalised to sum to 1 per pixel).
        labels: class names (the first synonym of each label).
        image: (H, W, 3) uint8 RGB input, for pictures (None if not kept).
        logits: (Q, H, W) float32 raw per-query cosine logits when requested, else None.
        queries: the text queries (synonyms included) behind ``logits``.
    """

    label_map: np.ndarray
    probs: np.ndarray
    labels: List[str]
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

    def overlay(self, alpha: float = 0.5):
        """PIL image: the colour mask blended over the input (``alpha`` = mask opacity)."""
        from PIL import Image

        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        colors = self.color_mask().astype(np.float32)
        if self.image is None:
            return Image.fromarray(colors.astype(np.uint8))
        blend = (1 - alpha) * self.image.astype(np.float32) + alpha * colors
        return Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8))

    def _repr_png_(self) -> bytes:
        import io

        buf = io.BytesIO()
        self.overlay().save(buf, format="PNG")
        return buf.getvalue()
