"""The ovseg CLI end to end (random weights of the real architectures) and its one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg.cli import find_images, main, parse_label_text
from ovseg.result import palette

FAST = ["--clip-weights", "random", "--vfm-weights", "random", "--vfm", "dino_s16", "--quiet", "--templates", "single"]


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.RandomState(0)
    sizes = {"a.jpg": (120, 160), "b.png": (97, 131)}
    for name, (h, w) in sizes.items():
        img = np.zeros((h, w, 3), np.uint8)
        img[: h // 2] = (90, 140, 230)
        img[h // 2:] = (60, 160, 50)
        img = np.clip(img + rng.randint(0, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / name)
    return d, sizes


def _check_outputs(out, sizes, labels):
    summary = json.loads((out / "results.json").read_text())
    assert summary["labels"] == labels and len(summary["images"]) == len(sizes)
    for rec in summary["images"]:
        h, w = sizes[os.path.basename(rec["file"])]
        assert (rec["height"], rec["width"]) == (h, w)
        lab = Image.open(out / rec["labels_png"])
        ov = Image.open(out / rec["overlay_png"])
        assert lab.mode == "P" and lab.size == (w, h) and ov.size == (w, h)
        arr = np.asarray(lab)
        assert arr.max() < len(labels)
        fr = {k: float(np.mean(arr == i)) for i, k in enumerate(labels)}
        assert fr == pytest.approx(rec["fractions"], abs=1e-6)  # results.json agrees with the PNG
        pal = np.asarray(lab.getpalette()[: 3 * len(labels)]).reshape(-1, 3)
        np.testing.assert_array_equal(pal, palette(len(labels)))
    return summary


def test_predict_in_process_folder(photos, tmp_path, capsys):
    d, sizes = photos
    out = tmp_path / "out"
    code = main(["predict", str(d), "--labels", "sky, grass; lawn", "--out", str(out), "--save-probs",
                 "--method", "proxyclip", *FAST])
    assert code == 0
    summary = _check_outputs(out, sizes, ["sky", "grass"])
    assert summary["clip_activation"] == "gelu"  # ViT-B-16 with random weights: open_clip's GELU config
    assert summary["clip_identity"] == dict(arch="ViT-B-16", source="random", tag=None, path=None, activation="gelu",
                                            seed=0, model_kwargs=None)
    rec = summary["images"][0]
    probs = np.load(out / rec["probs_npy"])
    assert probs.shape == (2, rec["height"], rec["width"]) and probs.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(Image.open(out / rec["labels_png"])), probs.argmax(0))


def test_predict_subprocess_glob_and_labels_file(photos, tmp_path):
    d, sizes = photos
    labels = tmp_path / "labels.txt"
    labels.write_text("# classes\nsky\n\ngrass; lawn\ntree\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of {}.\n")
    out = tmp_path / "out2"
    r = subprocess.run([sys.executable, "-m", "ovseg", "predict", str(d / "*.png"), "--labels-file", str(labels),
                        "--out", str(out), "--method", "naclip", "--clip-weights", "random", "--quiet",
                        "--templates", str(templates)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _check_outputs(out, {"b.png": sizes["b.png"]}, ["sky", "grass", "tree"])


@pytest.mark.parametrize("argv,needle", [
    (["predict", "missing.jpg", "--labels", "a"], "missing.jpg"),
    (["predict", "{img}", "--labels", "cat, , dog"], "empty"),
    (["predict", "{img}", "--labels", "cat, Cat"], "duplicate label 'Cat'"),
    (["predict", "{img}", "--labels", "cat", "--method", "naclp"], "did you mean 'naclip'"),
    (["predict", "{img}", "--labels", "cat", "--method", "naclip", "--vfm", "dino_b8"], "does not use a VFM"),
    (["predict", "{img}", "--labels", "cat", "--window", "-5"], "positive"),
    (["predict", "{img}", "--labels", "cat", "--window", "100", "--stride", "200"], "larger than window"),
    (["predict", "{img}", "--labels", "cat", "--clip", "ViT-B-61"], "did you mean 'ViT-B-16'"),
    (["predict", "{img}"], "--labels"),
    (["predict", "{notimg}", "--labels", "cat", "--method", "clip", "--clip-weights", "random"],
     "not a readable image"),
    (["predict", "{img}", "--labels", "cat", "--method", "clip", "--clip-weights", "random", "--clip-tag", "openai"],
     "clip_tag 'openai' names the weights a local file holds"),
    (["predict", "{img}", "--labels", "cat", "--method", "clip", "--clip-weights", "{ckpt}"],
     "--clip-tag openai"),
    (["predict", "{img}", "--labels", "cat", "--method", "clip", "--clip-weights", "{ckpt}", "--clip-tag", "opnai"],
     "did you mean 'openai'"),
])
def test_cli_errors_one_line_exit_2(argv, needle, photos, tmp_path, capsys):
    d, _ = photos
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    ckpt = tmp_path / "open_clip_pytorch_model.bin"  # unidentifiable: ViT-B-16's tags disagree on the activation
    torch.save({"logit_scale": torch.zeros(())}, ckpt)
    argv = [a.format(img=d / "a.jpg", notimg=bad, ckpt=ckpt) for a in argv]
    code = main(argv + ["--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("ovseg: error:") and needle in err


def test_cli_offline_error_names_file_and_option(photos, tmp_path):
    d, _ = photos
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "-m", "ovseg", "predict", str(d / "a.jpg"), "--labels", "sky",
                        "--method", "naclip", "--out", str(tmp_path / "o"), "--quiet"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert "--clip-weights PATH" in r.stderr and ("ViT-B-16.pt" in r.stderr or "open_clip_model" in r.stderr)


def test_list_and_doctor(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("proxyclip", "naclip", "dino_b8", "sd15", "ViT-B-16", "openai", "gaussian_kk"):
        assert word in out
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "weights in the local cache" in out and "dino_b8" in out
    lines = {ln.split()[1]: ln for ln in out.splitlines() if ln.strip().startswith("clip ")}
    assert lines["ViT-B-16/openai"].endswith("activation: quick_gelu")
    assert lines["ViT-H-14/laion2b_s32b_b79k"].endswith("activation: gelu")
    assert lines["ViT-B-16-quickgelu/metaclip_fullcc"].endswith("activation: quick_gelu")


def test_label_text_and_image_discovery(photos):
    d, _ = photos
    assert parse_label_text("cat, sofa; couch ,floor") == ["cat", "sofa; couch", "floor"]
    assert [p.name for p in find_images([str(d)])] == ["a.jpg", "b.png"]
    assert [p.name for p in find_images([str(d / "*.jpg")])] == ["a.jpg"]
    with pytest.raises(FileNotFoundError):
        find_images([str(d / "*.gif")])
