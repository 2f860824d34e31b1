"""Dataset loaders on synthetic data in every layout: pairing, ignore values, reduce_zero_label, errors."""
import numpy as np
import pytest

from ovseg.eval.datasets import DATASETS, SegmentationFolder, reduce_zero_label

from .synth import make_dataset


@pytest.mark.parametrize("name", list(DATASETS))
def test_layout_pairs_and_labels(name, tmp_path):
    written = make_dataset(name, tmp_path, n=3)
    ds = SegmentationFolder(name, str(tmp_path))
    assert sorted(s[0] for s in ds.samples) == sorted(w[0] for w in written)  # unlabelled image skipped
    position = {s[0]: i for i, s in enumerate(ds.samples)}
    for sid, lab in written:
        img, gt = ds[position[sid]]
        assert img.shape[:2] == lab.shape and img.dtype == np.uint8  # original resolution
        expected = reduce_zero_label(lab) if DATASETS[name].reduce_zero_label else lab
        np.testing.assert_array_equal(gt, expected)
    spec = DATASETS[name]
    if name in ("ade847", "pc459"):
        assert (ds.load_label(0) == 65535).any()  # uint16 .tif read without clipping
    if spec.reduce_zero_label:
        assert (ds.load_label(0) == 255).sum() > (ds.load_label(0)[-2:] == 255).sum()  # zeros became ignore


def test_reduce_zero_label_rule():
    lab = np.array([[0, 1, 5, 255]])
    np.testing.assert_array_equal(reduce_zero_label(lab), [[255, 0, 4, 255]])


def test_errors_name_the_expected_layout(tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        SegmentationFolder("voc21", str(tmp_path / "nowhere"))
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(FileNotFoundError, match="SegmentationClass"):
        SegmentationFolder("voc21", str(tmp_path))
    with pytest.raises(ValueError, match="did you mean 'voc21'"):
        SegmentationFolder("voc12", str(tmp_path))
