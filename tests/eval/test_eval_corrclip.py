"""CorrCLIP's evaluation harness: its class files and settings, the published row chosen by how masks were made,
and ``ovseg predict`` / ``ovseg eval`` with ``--masks`` (random weights of the real architectures)."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg.cli import main
from ovseg.eval.datasets import DATASETS
from ovseg.eval.presets import get_eval_preset, read_class_file
from ovseg.eval.published import PAPER_DATASETS, published_for
from ovseg.methods import get_method

from .synth import make_dataset

FAST = ["--method", "corrclip", "--clip-weights", "random", "--vfm-weights", "random", "--vfm", "dino_s16",
        "--templates", "single", "--short-side", "112", "--window", "112", "--stride", "56", "--quiet"]


def test_class_files_and_settings():
    for name in PAPER_DATASETS:
        p = get_eval_preset("corrclip", name)
        labels = read_class_file(p.class_file, p.separator)
        assert len(labels.names) == DATASETS[name].num_classes, name
        assert "person" not in labels.queries  # CorrCLIP's files say "people"
    voc = read_class_file(get_eval_preset("corrclip", "voc21").class_file, "; ")
    assert "people" in voc.names and len(voc.queries) == 46  # class 0: 26 background words
    obj = read_class_file(get_eval_preset("corrclip", "coco_object").class_file, "; ")
    assert len(obj.queries) == 96 and "bed" not in obj.queries[:16]  # background without "bed"
    assert (get_eval_preset("corrclip", "voc21").threshold, get_eval_preset("corrclip", "context60").threshold,
            get_eval_preset("corrclip", "coco_object").threshold) == (0.2, 0.15, 0.25)
    city = get_eval_preset("corrclip", "cityscapes")
    assert (city.short_side, city.window, city.stride) == (448, 224, 112)
    assert get_eval_preset("corrclip", "ade20k").short_side == 448


def test_published_row_depends_on_how_masks_were_made():
    opts = dict(get_method("corrclip").strategy_options)
    given = published_for("corrclip", "ViT-B-16-quickgelu", "dino_b8", False, dict(opts, masks="given"))
    generated = published_for("corrclip", "ViT-B-16-quickgelu", "dino_b8", False, dict(opts, masks="generated"))
    assert given["miou"]["voc21"] == 74.8 and "SAM2_32" in given["source"]  # the authors' pre-generated masks
    assert generated["miou"]["voc21"] == 73.9 and "SAM2_8" in generated["source"]  # SAM 2.0 Hiera-L, 8x8 points
    assert given["clip_weights"] == "metaclip_fullcc"
    assert np.mean(list(given["miou"].values())) == pytest.approx(51.0, abs=0.05)  # the README's average
    other = dict(opts, masks="generated", mask_generator="sam_vit_h")
    assert published_for("corrclip", "ViT-B-16-quickgelu", "dino_b8", False, other) is None  # not published
    large = published_for("corrclip_l14", "ViT-L-14-quickgelu", "dino_b8", False, dict(opts, masks="given"))
    assert large["miou"]["ade20k"] == 30.7
    assert published_for("proxyclip", "ViT-B-16", "dino_b8", False)["miou"]["voc21"] == 61.3  # unchanged rows


@pytest.fixture
def masked_photos(tmp_path):
    imgs, masks = tmp_path / "photos", tmp_path / "masks"
    imgs.mkdir()
    masks.mkdir()
    for name, (h, w) in {"a": (60, 80), "b": (50, 70)}.items():
        img = np.zeros((h, w, 3), np.uint8)
        img[: h // 2] = (90, 140, 230)
        img[h // 2:] = (60, 160, 50)
        Image.fromarray(img).save(imgs / f"{name}.png")
        regions = np.zeros((h, w), np.int32)
        regions[: h // 2, : w // 2] = 1
        regions[h // 2:] = 2
        np.savez(masks / f"{name}.npz", instance_mask=regions)  # CorrCLIP's region_masks layout
    return imgs, masks


def test_predict_with_masks_folder(masked_photos, tmp_path, capsys):
    imgs, masks = masked_photos
    out = tmp_path / "out"
    assert main(["predict", str(imgs), "--labels", "sky, grass", "--out", str(out), "--masks", str(masks),
                 *FAST]) == 0  # --masks: no mask generator is built (none is installed here)
    summary = json.loads((out / "results.json").read_text())
    for rec in summary["images"]:
        lab = np.asarray(Image.open(out / rec["labels_png"]))
        regions = np.load(masks / (rec["file"].rsplit("/", 1)[-1][:-4] + ".npz"))["instance_mask"]
        for rid in (1, 2):  # the vote: one label per region
            assert len(np.unique(lab[regions == rid])) == 1
    (masks / "b.npz").unlink()
    assert main(["predict", str(imgs), "--labels", "sky, grass", "--out", str(out), "--masks", str(masks),
                 *FAST]) == 2
    assert "no mask file for image 'b'" in capsys.readouterr().err
    assert main(["predict", str(imgs), "--labels", "sky", "--out", str(out), "--masks", str(tmp_path / "nope"),
                 *FAST]) == 2
    assert "--masks: folder not found" in capsys.readouterr().err


def test_eval_with_masks_reports_the_given_masks_row(tmp_path, capsys):
    root, masks = tmp_path / "voc", tmp_path / "region_masks"
    written = make_dataset("voc21", root, n=2, size=(40, 52))
    (masks / "voc").mkdir(parents=True)  # CorrCLIP's layout: region_masks/voc/<stem>.npz
    for sid, lab in written:
        np.savez(masks / "voc" / f"{sid}.npz", instance_mask=(lab != 255).astype(np.int64) * (1 + lab % 3))
    out = tmp_path / "res"
    fast = [a if a != "dino_s16" else "dino_b8" for a in FAST]  # the published row is for DINO-B/8
    assert main(["eval", "--dataset", "voc21", "--root", str(root), "--out", str(out), "--masks", str(masks),
                 *fast]) == 0
    r = json.loads((out / "voc21_corrclip.json").read_text())
    assert r["num_images"] == 2 and r["masks"] == str(masks / "voc")
    assert r["published"]["mIoU"] == 74.8 and "SAM2_32" in r["published"]["source"]
    options = r["settings"]["options"]  # the method config; its strategy options under "options"
    assert options["threshold"] == 0.2 and options["options"]["mask_generator"] == "none"
    keyed = json.loads((Path(r["predictions"]) / "settings.json").read_text())
    assert keyed["masks"] == str(masks / "voc")  # the masks are part of the key: --resume never mixes other masks
    assert "voc21 corrclip: mIoU" in capsys.readouterr().out
