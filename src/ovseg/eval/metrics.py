"""mIoU from a confusion matrix accumulated in int64 on the device, matching mmseg's ``IoUMetric``.

Pixels labelled ``ignore_index`` are skipped. Like the references (docs/evaluation.md), ground-truth values
outside ``[0, C)`` that are not ``ignore_index`` (e.g. 65535 in ADE-847/PC-459 .tif labels) are *not* ignored: their
predictions still count in the predicted area, so they enlarge unions. They are collected in an extra row of
the matrix; ``strict_ignore=True`` drops them instead.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import InvalidInputError

__all__ = ["ConfusionMatrix", "metrics_from_confusion"]

ArrayLike = Union[np.ndarray, torch.Tensor]


class ConfusionMatrix:
    """``mat[g, p]`` counts pixels of ground truth g predicted as p; row C holds out-of-range ground truth."""

    def __init__(self, num_classes: int, *, ignore_index: int = 255, strict_ignore: bool = False,
                 device: Union[str, torch.device] = "cpu"):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.strict_ignore = strict_ignore
        self.mat = torch.zeros(self.num_classes + 1, self.num_classes, dtype=torch.int64, device=device)

    def update(self, pred: ArrayLike, gt: ArrayLike) -> None:
        c = self.num_classes
        pred = torch.as_tensor(pred, device=self.mat.device).long().flatten()
        gt = torch.as_tensor(gt, device=self.mat.device).long().flatten()
        if pred.shape != gt.shape:
            raise InvalidInputError(f"prediction has {pred.numel()} pixels, ground truth {gt.numel()}")
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= c):
            raise InvalidInputError(f"predictions must be class indices in [0, {c})")
        valid = gt != self.ignore_index
        out_of_range = (gt < 0) | (gt >= c)
        if self.strict_ignore:
            valid &= ~out_of_range
        g = torch.where(out_of_range, torch.full_like(gt, c), gt)[valid]
        idx = g * c + pred[valid]
        self.mat += torch.bincount(idx, minlength=(c + 1) * c).view(c + 1, c)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        self.mat += other.mat.to(self.mat.device)
        return self

    def all_reduce(self) -> None:
        """Sum over processes (torch.distributed must be initialised)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)

    def compute(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
        return metrics_from_confusion(self.mat.cpu().numpy(), class_names)


def metrics_from_confusion(mat: np.ndarray, class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """mIoU, mAcc, aAcc (in %) and per-class IoU/Acc; classes absent from prediction and truth are NaN and
    excluded from the means (mmseg's nanmean)."""
    c = mat.shape[1]
    mat = mat.astype(np.float64)
    inter = np.diag(mat[:c])
    area_pred = mat.sum(axis=0)
    area_label = mat[:c].sum(axis=1)
    union = area_pred + area_label - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
        acc = np.where(area_label > 0, inter / area_label, np.nan)
    names: List[str] = list(class_names) if class_names is not None else [str(i) for i in range(c)]

    def pct(x):
        return None if np.isnan(x) else round(float(x) * 100, 4)

    return {
        "mIoU": pct(np.nanmean(iou)) if np.isfinite(iou).any() else None,
        "mAcc": pct(np.nanmean(acc)) if np.isfinite(acc).any() else None,
        "aAcc": pct(inter.sum() / area_label.sum()) if area_label.sum() > 0 else None,
        "per_class": {n: {"IoU": pct(i), "Acc": pct(a)} for n, i, a in zip(names, iou, acc)},
        "pixels": int(area_label.sum()),
    }
