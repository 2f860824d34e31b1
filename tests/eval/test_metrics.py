"""mIoU from the int64 confusion matrix against hand-computed and straightforward numpy references."""
import numpy as np
import pytest
import torch

from ovseg.eval.metrics import ConfusionMatrix, metrics_from_confusion


def test_hand_computed_with_absent_class():
    # classes 0, 1, 2, 3; class 3 absent from prediction and truth -> NaN, excluded from the mean
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 3 - 1, 1]])
    cm = ConfusionMatrix(4)
    cm.update(pred, gt)
    m = cm.compute(["a", "b", "c", "d"])
    # class 0: inter 1, pred 2 (pos0, pos5), label 2 -> union 3 -> 1/3
    # class 1: inter 3, pred 3 (1,2,3 + pos7) = 4 -> label 3 -> union 4 -> 3/4
    # class 2: inter 1, pred 1, label 2 -> union 2 -> 1/2 ; ignored pixel (255) skipped
    assert m["per_class"]["a"]["IoU"] == pytest.approx(100 / 3, abs=1e-3)
    assert m["per_class"]["b"]["IoU"] == pytest.approx(75.0)
    assert m["per_class"]["c"]["IoU"] == pytest.approx(50.0)
    assert m["per_class"]["d"]["IoU"] is None and m["per_class"]["d"]["Acc"] is None
    assert m["mIoU"] == pytest.approx((100 / 3 + 75 + 50) / 3, abs=1e-3)
    assert m["aAcc"] == pytest.approx(100 * 5 / 7, abs=1e-3)
    assert m["mAcc"] == pytest.approx((50 + 100 + 50) / 3, abs=1e-3)
    assert cm.mat.dtype == torch.int64 and int(cm.mat.sum()) == 7


def _numpy_reference(preds, gts, c, ignore=255):
    """mmseg IoUMetric, written plainly."""
    inter, ap, al = np.zeros(c), np.zeros(c), np.zeros(c)
    for p, g in zip(preds, gts):
        keep = g != ignore
        p, g = p[keep], g[keep]
        inter += np.histogram(p[p == g], bins=c, range=(0, c))[0]
        ap += np.histogram(p, bins=c, range=(0, c))[0]
        al += np.histogram(g, bins=c, range=(0, c))[0]  # values outside [0, c) are not counted here
    union = ap + al - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    return np.nanmean(iou) * 100, inter.sum() / al.sum() * 100


def test_equals_straightforward_numpy_with_out_of_range_labels():
    rng = np.random.RandomState(0)
    c = 7
    preds, gts = [], []
    cm = ConfusionMatrix(c)
    for _ in range(5):
        g = rng.randint(0, c, (30, 40))
        g[rng.rand(30, 40) < 0.1] = 255
        g[rng.rand(30, 40) < 0.05] = 65535  # not ignored by the reference: counts in predicted areas
        p = rng.randint(0, c, (30, 40))
        preds.append(p)
        gts.append(g)
        cm.update(torch.from_numpy(p), torch.from_numpy(g))
    miou, aacc = _numpy_reference(preds, gts, c)
    m = cm.compute()
    assert m["mIoU"] == pytest.approx(miou, abs=1e-3) and m["aAcc"] == pytest.approx(aacc, abs=1e-3)
    strict = ConfusionMatrix(c, strict_ignore=True)
    for p, g in zip(preds, gts):
        strict.update(p, g)
    assert strict.compute()["mIoU"] > m["mIoU"]  # out-of-range labels no longer inflate unions


def test_merge_equals_single_matrix_and_bad_predictions():
    rng = np.random.RandomState(1)
    a, b, both = ConfusionMatrix(3), ConfusionMatrix(3), ConfusionMatrix(3)
    for i in range(4):
        p, g = rng.randint(0, 3, (5, 5)), rng.randint(0, 3, (5, 5))
        (a if i % 2 else b).update(p, g)
        both.update(p, g)
    assert torch.equal(a.merge(b).mat, both.mat)
    with pytest.raises(ValueError, match="class indices"):
        a.update(np.full((2, 2), 3), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="pixels"):
        a.update(np.zeros((2, 2), int), np.zeros((3, 2), int))
    assert metrics_from_confusion(np.zeros((4, 3), np.int64))["mIoU"] is None
