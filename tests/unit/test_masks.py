"""User-supplied region masks and the mask-generator registry, without any mask-generator package: painting,
every accepted form, files, errors, and the registry's checks."""
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg.errors import InvalidInputError, InvalidTypeError, MissingDependencyError, PathNotFoundError
from ovseg.masks import (
    REGION_MASK_FOLDERS,
    as_region_map,
    create_mask_generator,
    find_mask_file,
    get_mask_generator_cfg,
    list_mask_generators,
    load_region_map,
    mask_folder_for,
    paint_by_area,
)
from ovseg.masks.base import check_settings
from ovseg.ops.corrclip import paint_masks


def _blobs(seed=0, k=5, size=(23, 31)):
    rng = np.random.RandomState(seed)
    masks = []
    for _ in range(k):
        m = np.zeros(size, bool)
        y, x = rng.randint(0, size[0] - 4), rng.randint(0, size[1] - 4)
        m[y:y + rng.randint(3, 15), x:x + rng.randint(3, 20)] = True
        masks.append(m)
    return masks


def test_paint_by_area_hand_example():
    big = np.zeros((4, 6), bool)
    big[:, :4] = True  # area 16
    small = np.zeros((4, 6), bool)
    small[1:3, 2:6] = True  # area 8, overlaps big on 4 pixels
    out = paint_by_area([big, small], (4, 6))
    # small is painted first (id 1), big second (id 2) and wins the overlap; uncovered pixels stay 0
    want = torch.tensor([[2, 2, 2, 2, 0, 0], [2, 2, 2, 2, 1, 1], [2, 2, 2, 2, 1, 1], [2, 2, 2, 2, 0, 0]])
    assert torch.equal(out, want)


def test_paint_by_area_is_the_official_painting_and_stable():
    masks = _blobs()
    masks.append(masks[1].copy())  # an equal area: the stable sort keeps the given order
    out = paint_by_area(masks, masks[0].shape)
    stacked = torch.from_numpy(np.stack(masks))
    ref = paint_masks(stacked, order=stacked.flatten(1).sum(1))  # phase-1 op: sort by area, ids = rank + 1
    assert torch.equal(out, ref)
    # the reference's own loop: sorted(anns, key=area), ids 1..n
    anns = [{"segmentation": m, "area": int(m.sum())} for m in masks]
    loop = np.zeros(masks[0].shape, int)
    for i, a in enumerate(sorted(anns, key=lambda a: a["area"]), start=1):
        loop[a["segmentation"]] = i
    np.testing.assert_array_equal(out.numpy(), loop)


def test_every_form_gives_the_same_region_map():
    masks = _blobs(1)
    size = masks[0].shape
    want = paint_by_area(masks, size)
    forms = [masks, np.stack(masks), torch.from_numpy(np.stack(masks)), [torch.from_numpy(m) for m in masks],
             [m.astype(np.uint8) for m in masks], [{"segmentation": m, "area": int(m.sum())} for m in masks],
             want.numpy().astype(np.uint16), want, Image.fromarray(want.numpy().astype(np.uint8))]
    for form in forms:
        out = as_region_map(form, size)
        assert out.dtype == torch.int64 and torch.equal(out, want), type(form)
    assert torch.equal(as_region_map(masks[0]), torch.from_numpy(masks[0].astype(np.int64)))  # one boolean mask
    assert torch.equal(as_region_map([], (3, 4)), torch.zeros(3, 4, dtype=torch.int64))  # no masks: all unsegmented
    labels = np.array([[-1, 5], [7, 7]])  # any integers: the smallest (-1) means "no mask"
    assert as_region_map(labels).tolist() == [[-1, 5], [7, 7]]


@pytest.mark.parametrize("value, error, needle", [
    (np.zeros((4, 5), np.float32), InvalidInputError, "integer region ids"),
    (np.zeros((4, 6), np.int64), InvalidInputError, "(4, 5)"),
    (np.zeros((4, 5, 3), np.uint8), InvalidInputError, "(H, W, C) image"),
    (np.full((4, 5), 1 << 25), InvalidInputError, "renumber"),
    ([np.zeros((4, 5), bool), np.zeros((4, 6), bool)], InvalidInputError, "mask 1 has shape"),
    ([np.full((4, 5), 2)], InvalidInputError, "boolean"),
    (Image.new("RGB", (5, 4)), InvalidInputError, "single-channel"),
    ("missing.png", PathNotFoundError, "missing.png"),
    (object(), InvalidTypeError, "label image"),
    ([{"segmentation": {"counts": "x", "size": [4, 5]}}], InvalidInputError, "RLE"),
])
def test_bad_masks_raise_naming_the_problem(value, error, needle):
    with pytest.raises(error, match=None) as e:
        as_region_map(value, (4, 5))
    assert needle in str(e.value)


def test_files_npz_npy_png(tmp_path):
    want = paint_by_area(_blobs(2), (23, 31))
    np.savez(tmp_path / "a.npz", instance_mask=want.numpy().astype(np.int32))  # CorrCLIP's region_masks layout
    np.save(tmp_path / "b.npy", want.numpy())
    Image.fromarray(want.numpy().astype(np.uint16)).save(tmp_path / "c.png")  # 16-bit label PNG
    Image.fromarray(want.numpy().astype(np.uint8)).save(tmp_path / "d.png")
    for stem in "abcd":
        assert torch.equal(load_region_map(find_mask_file(tmp_path, stem)), want), stem
    assert torch.equal(as_region_map(str(tmp_path / "a.npz"), (23, 31)), want)  # masks= also takes a file
    np.savez(tmp_path / "e.npz", x=want.numpy(), y=want.numpy())
    with pytest.raises(InvalidInputError, match="instance_mask"):
        load_region_map(tmp_path / "e.npz")
    Image.new("RGB", (4, 4)).save(tmp_path / "f.png")
    with pytest.raises(InvalidInputError, match="f.png"):
        load_region_map(tmp_path / "f.png")
    with pytest.raises(PathNotFoundError, match="zzz.npz"):
        find_mask_file(tmp_path, "zzz")


def test_mask_folder_for_benchmarks(tmp_path):
    (tmp_path / "voc").mkdir()
    (tmp_path / "ade20k").mkdir()
    assert mask_folder_for(tmp_path, "voc20") == tmp_path / "voc"  # CorrCLIP's region_masks layout
    assert mask_folder_for(tmp_path, "ade20k") == tmp_path / "ade20k"  # ovseg's dataset name first
    assert mask_folder_for(tmp_path, "coco_stuff") == tmp_path  # neither: the folder itself
    assert REGION_MASK_FOLDERS["cityscapes"] == "city"
    with pytest.raises(PathNotFoundError):
        mask_folder_for(tmp_path / "missing", "voc21")


def test_registry_names_configs_and_errors(monkeypatch):
    names = list_mask_generators()
    assert {"sam2_hiera_l", "sam2.1_hiera_l", "sam_vit_h", "sam_vit_b"} <= set(names)
    cfg = get_mask_generator_cfg("sam2_hiera_l")
    # CorrCLIP v1: SAM 2.0 Hiera-L release file, 8x8 points, thresholds 0.4, one mask per point
    assert cfg.release_file == "sam2_hiera_large.pt" and cfg.model == "configs/sam2/sam2_hiera_l.yaml"
    assert dict(cfg.settings) == dict(points_per_side=8, pred_iou_thresh=0.4, stability_score_thresh=0.4,
                                      multimask_output=False)
    assert get_mask_generator_cfg("sam_vit_h").release_file == "sam_vit_h_4b8939.pth"
    with pytest.raises(ValueError, match="did you mean 'sam2_hiera_l'"):
        create_mask_generator("sam2_hira_l")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("sam2", "segment_anything")
                        else real(n, *a))
    with pytest.raises(MissingDependencyError, match="SAM2_BUILD_CUDA=0 pip install --no-build-isolation"):
        create_mask_generator("sam2_hiera_l")
    with pytest.raises(MissingDependencyError, match=r'ovseg\[sam\]'):
        create_mask_generator("sam_vit_b", "random")


def test_settings_are_checked_against_the_signature():
    def amg(self, model, points_per_side=32, pred_iou_thresh=0.8, **kwargs):
        pass

    assert check_settings("g", {"points_per_side": 8}, amg) == {"points_per_side": 8}
    with pytest.raises(InvalidInputError, match="did you mean 'pred_iou_thresh'"):
        check_settings("g", {"pred_iou_thres": 0.4}, amg)  # **kwargs would have swallowed it
