"""The classification head shared by every method (docs/methods.md, "Post-processing").

Per pixel: ``softmax(logits · logit_scale)`` over all queries (synonyms included), a class scores the maximum of
its synonyms' probabilities, optionally classes covering too small an area are dropped (SCLIP/SC-CLIP's
``area_thd``), argmax (ties to the lowest index), and pixels whose best class score is below ``threshold`` go to
class 0. Everything runs in float32 and works on any trailing shape, so the predictor can apply it band by band.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

__all__ = ["Head", "class_scores", "postprocess"]


def class_scores(logits: torch.Tensor, query_class: Sequence[int], num_classes: int, logit_scale: float
                 ) -> torch.Tensor:
    """Cosine logits (Q, ...) -> class scores (C, ...): softmax over queries of ``logits · logit_scale``, then the
    max over each class's synonyms. Not renormalised (these are what the threshold sees)."""
    probs = torch.softmax(logits.float() * logit_scale, dim=0)
    if len(query_class) == num_classes:
        return probs
    index = torch.as_tensor(query_class, device=logits.device).view((-1,) + (1,) * (probs.dim() - 1))
    scores = probs.new_zeros((num_classes,) + tuple(probs.shape[1:]))
    return scores.scatter_reduce(0, index.expand_as(probs), probs, reduce="amax", include_self=False)


@dataclass(frozen=True)
class Head:
    """Scores and labels from cosine logits.

    Attributes:
        logit_scale: temperature of the softmax over queries (40 in every seed method).
        threshold: the references' ``prob_thd``: pixels whose best class score is below it go to class 0.
        area_threshold: SCLIP/SC-CLIP's ``area_thd`` (0 = off): classes c ≥ 1 whose argmax area is at most this
            fraction of all pixels predicted as some class ≥ 1 are dropped before the final argmax.
    """

    logit_scale: float = 40.0
    threshold: float = 0.0
    area_threshold: float = 0.0

    def scores(self, logits: torch.Tensor, query_class: Sequence[int], num_classes: int) -> torch.Tensor:
        """(Q, ...) cosine logits -> (C, ...) class scores (un-normalised)."""
        return class_scores(logits, query_class, num_classes, self.logit_scale)

    def classify(self, scores: torch.Tensor, dropped: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Class scores (C, ...) -> (labels (...) int64, best class score (...)).

        ``dropped`` (C,) bool zeroes the scores of classes removed by the area filter before the argmax; the
        threshold compares the best score *after* that, as the references do.
        """
        if dropped is not None and bool(dropped.any()):
            scores = scores.masked_fill(dropped.view((-1,) + (1,) * (scores.dim() - 1)), 0.0)
        best, labels = scores.max(dim=0)
        if self.threshold > 0:
            labels = torch.where(best < self.threshold, torch.zeros_like(labels), labels)
        return labels, best

    def area_counts(self, scores: torch.Tensor) -> torch.Tensor:
        """Argmax pixel counts per class (C,) int64 of class scores (C, ...), for the area filter."""
        return torch.bincount(scores.argmax(dim=0).flatten(), minlength=scores.shape[0])

    def dropped_classes(self, counts: torch.Tensor) -> Optional[torch.Tensor]:
        """The classes the area filter removes given whole-image argmax counts (C,), or None when it is off."""
        if self.area_threshold <= 0:
            return None
        counts = counts.to(torch.float64)
        total = counts[1:].sum()
        dropped = counts <= self.area_threshold * total
        dropped[0] = False  # class 0 (background) is never filtered
        return dropped


def postprocess(logits: torch.Tensor, query_class: Sequence[int], num_classes: int, *, logit_scale: float = 40.0,
                threshold: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosine logits (Q, H, W) -> (label map (H, W) int64, class scores (C, H, W)) as the references do.

    A convenience around :class:`Head` for a whole image at once (no area filter).
    """
    head = Head(logit_scale=logit_scale, threshold=threshold)
    scores = head.scores(logits, query_class, num_classes)
    labels, _ = head.classify(scores)
    return labels, scores
