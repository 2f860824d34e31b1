"""The ovseg CLI end to end (random weights of the real architectures) and its one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg.cli import EXIT_PARTIAL, find_images, main, parse_label_text
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
    (["predict", "{img}", "--labels", "cat", "--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["predict", "{img}", "--labels", "cat", "--threshold", "2"], "--threshold must be in [0, 1]"),
    (["predict", "{img}", "--labels", "cat", "--max-pixels", "0"], "--max-pixels"),
    (["predict", "{img}", "--labels", "cat", "--device", "xpu"], "xpu is not available"),
    (["predict", "{img}", "--labels", "cat", "--device", "gpu"], "not a device name"),
    (["predict", "{img}", "--labels", "cat", "--out", "{file}"], "is an existing file"),
    (["predict", "{img}", "--labels", "cat", "--out", "{file}/sub"], "is a file"),
    (["predict", "{img}", "--labels", "cat", "--method", "naclip", "--vfm-weights", "random"], "uses no VFM"),
    (["predict", "{img}", "--labels", "cat", "--random", "--clip-weights", "openai"], "--random replaces"),
    (["predict", "{img}", "--labels", "cat", "--templates", "a photo"], "template"),
    (["predict", "{img}", "--labels", "cat", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["predict", "{img}", "--labels", "cat", "--batch-size", "0"], "--batch-size"),
    (["predict", "{img}", "--labels", "cat", "--precision", "fp8"], "invalid choice: 'fp8'"),
    (["eval", "--dataset", "voc21", "--root", "{missing}"], "not found"),
    (["eval", "--dataset", "voc21", "--root", "{root}", "--limit", "0"], "--limit must be a positive"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_cli_errors_one_line_exit_2_before_any_model(argv, needle, photos, tmp_path, capsys, monkeypatch):
    import ovseg.segmenter

    def no_models(*a, **k):  # every check must happen before a model is built
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(ovseg.segmenter.Segmenter, "__init__", no_models)
    d, _ = photos
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    fmt = dict(img=d / "a.jpg", file=afile, missing=tmp_path / "missing", root=tmp_path)
    argv = [a.format(**fmt) for a in argv]
    if "--out" not in argv and argv[0] != "frobnicate":
        argv += ["--out", str(tmp_path / "o")]
    code = main(argv + (["--quiet"] if argv[0] != "frobnicate" else []))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("ovseg: error:") and needle in err, err


@pytest.mark.parametrize("argv, needle", [
    (["--clip-weights", "random", "--clip-tag", "openai"], "clip_tag 'openai' names the weights a local file holds"),
    (["--clip-weights", "{ckpt}"], "--clip-tag openai"),
    (["--clip-weights", "{ckpt}", "--clip-tag", "opnai"], "did you mean 'openai'"),
])
def test_clip_tag_errors_are_one_line(argv, needle, photos, tmp_path, capsys):
    d, _ = photos
    ckpt = tmp_path / "open_clip_pytorch_model.bin"  # unidentifiable: ViT-B-16's tags disagree on the activation
    torch.save({"logit_scale": torch.zeros(())}, ckpt)
    argv = ["predict", str(d / "a.jpg"), "--labels", "cat", "--method", "clip", "--out", str(tmp_path / "o"),
            "--quiet"] + [a.format(ckpt=ckpt) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("ovseg: error:") and needle in err, err


def test_out_not_writable_is_a_one_line_error(photos, tmp_path, capsys):
    d, _ = photos
    if os.geteuid() == 0:  # root writes anywhere on a normal file system: use one that refuses folders
        target = "/proc/ovseg-test-out/o"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "o")
    assert main(["predict", str(d / "a.jpg"), "--labels", "cat", "--out", target, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not writable" in err and target in err


def test_unreadable_file_is_skipped_recorded_and_exit_3(photos, tmp_path, capsys):
    d, sizes = photos
    (d / "c_broken.jpg").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    code = main(["predict", str(d), "--labels", "sky, grass", "--out", str(out), "--method", "clip", "--random",
                 "--templates", "single", "--short-side", "64", "--quiet"])
    err = capsys.readouterr().err
    assert code == EXIT_PARTIAL == 3
    assert "skipped" in err and "c_broken.jpg" in err and "not a readable image" in err
    summary = _check_outputs(out, sizes, ["sky", "grass"])  # the other images were all segmented
    assert summary["complete"] is True and summary["num_failed"] == 1
    assert summary["failed"][0]["file"].endswith("c_broken.jpg") and "not a readable image" in \
        summary["failed"][0]["error"]


def test_decompression_bomb_is_one_line_naming_max_pixels(tmp_path, capsys):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    big = tmp_path / "huge.png"  # a 15000 x 15000 PNG header (no pixel data needed: Pillow refuses it at open)
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 15000, 15000, 8, 0, 0, 0, 0))
                    + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    code = main(["predict", str(big), "--labels", "a, b", "--out", str(tmp_path / "o"), "--method", "clip",
                 "--random", "--templates", "single", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert "decompression-bomb limit" in err[0] and "15000x15000" in err[0] and "--max-pixels" in err[0]
    # allowing it gets past the limit: the (truncated) file is then decoded and found broken
    code = main(["predict", str(big), "--labels", "a, b", "--out", str(tmp_path / "o"), "--method", "clip",
                 "--random", "--templates", "single", "--quiet", "--max-pixels", str(15000 * 15000)])
    err = capsys.readouterr().err
    assert code == 3 and "decompression-bomb" not in err and "not a readable image" in err


def test_bugs_keep_their_traceback_and_results_json_is_still_written(photos, tmp_path, monkeypatch):
    import ovseg.segmenter

    def boom(self, *a, **k):
        raise RuntimeError("an ovseg bug")

    monkeypatch.setattr(ovseg.segmenter.Segmenter, "predict", boom)
    d, _ = photos
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="an ovseg bug"):  # not swallowed into one line
        main(["predict", str(d), "--labels", "sky", "--out", str(out), "--method", "clip", "--random",
              "--templates", "single", "--quiet"])
    summary = json.loads((out / "results.json").read_text())
    assert summary["complete"] is False and summary["images"] == []


def test_results_json_records_settings_synonyms_and_layout(photos, tmp_path, capsys):
    d, sizes = photos
    nested = d / "sub" / "deeper"
    nested.mkdir(parents=True)
    Image.open(d / "a.jpg").save(nested / "a.png")  # same stem as photos/a.jpg, in a sub-folder
    out = tmp_path / "out"
    args = ["predict", str(d), str(d / "a.jpg"), "--recursive", "--labels", "sky, grass; lawn; turf",
            "--out", str(out), "--method", "naclip", "--random", "--templates", "single", "--short-side", "64",
            "--threshold", "0.25", "--quiet"]
    assert main(args) == 0
    s = json.loads((out / "results.json").read_text())
    files = [os.path.relpath(r["file"], d) for r in s["images"]]
    assert files == ["a.jpg", "b.png", os.path.join("sub", "deeper", "a.png")]  # a.jpg given twice: once
    assert s["images"][2]["labels_png"] == os.path.join("sub", "deeper", "a_labels.png")  # mirrored layout
    st = s["settings"]
    assert st["method"] == "naclip" and st["ovseg"] and st["precision"] == "fp32" and st["device"] == "cpu"
    assert st["options"]["short_side"] == 64 and st["options"]["threshold"] == 0.25
    assert st["options"]["pamr_steps"] == 10 and st["options"]["window"] == [224, 224]
    assert st["templates"] == ["a photo of a {}."] and st["clip"]["weights"] == "random"
    assert len(st["clip"]["digest"]) == 16 and st["vfm"] is None
    assert s["synonyms"] == {"sky": ["sky"], "grass": ["grass", "lawn", "turf"]}
    assert s["query_class"] == ["sky", "grass", "grass", "grass"]
    capsys.readouterr()
    assert main(args) == 0  # a second run into the same folder warns before overwriting
    assert "holds the results of an earlier run" in capsys.readouterr().err


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
    import torch

    from ovseg.precision import resolve_precision

    assert f"torch kernels: {torch.backends.cpu.get_cpu_capability()}" in out and "native bf16" in out
    assert f'precision "auto" picks: {resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu")}' \
        in out


def test_cache_info_and_clear(_ovseg_home, capsys):
    import torch

    from ovseg.cache import TextEmbeddingCache

    TextEmbeddingCache().put_many({"arch": "x"}, ("{}",), {"cat": torch.ones(4), "dog": torch.zeros(4)})
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert str(_ovseg_home / "text") in out and "entries: 2" in out and "bound: 512 MB" in out
    assert main(["cache", "clear"]) == 0
    assert "removed 2 text-embedding entries" in capsys.readouterr().out
    assert main(["cache", "info"]) == 0
    assert "entries: 0" in capsys.readouterr().out
    assert main(["cache", "purge"]) == 2  # a usage error: one line, exit code 2
    assert "invalid choice: 'purge'" in capsys.readouterr().err


def test_label_text_and_image_discovery(photos):
    d, _ = photos
    assert parse_label_text("cat, sofa; couch ,floor") == ["cat", "sofa; couch", "floor"]
    assert [p.name for p in find_images([str(d)])] == ["a.jpg", "b.png"]
    assert [p.name for p in find_images([str(d), str(d / "b.png"), str(d / "*.png")])] == ["a.jpg", "b.png"]
    assert [p.name for p in find_images([str(d / "*.jpg")])] == ["a.jpg"]
    with pytest.raises(FileNotFoundError):
        find_images([str(d / "*.gif")])


def test_vfm_weights_per_role_reach_the_segmenter(tmp_path, monkeypatch):
    """--vfm-weights ROLE=FILE (repeated) gives each VFM role of a multi-VFM method its own file; a plain value is
    the "vfm" role; an unknown role, a role given twice or a missing file is a one-line error before any model is
    built."""
    from ovseg.cli import build_parser, check_model_args, vfm_weights_arg
    from ovseg.errors import InvalidInputError, PathNotFoundError

    monkeypatch.chdir(tmp_path)
    for name in ("dino.pth", "sam_vit_b.pth", "a", "b"):
        (tmp_path / name).write_bytes(b"")

    def kwargs(*argv):
        return check_model_args(build_parser().parse_args(["predict", "x.jpg", "--labels", "a", *argv]))

    kw = kwargs("--method", "trident", "--vfm-weights", "vfm=dino.pth", "--vfm-weights", "sam=sam_vit_b.pth")
    assert kw["vfm_weights"] == {"vfm": "dino.pth", "sam": "sam_vit_b.pth"}
    assert kwargs("--method", "proxyclip", "--vfm-weights", "dino.pth")["vfm_weights"] == "dino.pth"
    assert kwargs("--method", "trident", "--random")["vfm_weights"] == {"vfm": "random", "sam": "random"}
    assert vfm_weights_arg(["dino.pth", "sam=s.pth"], ["vfm", "sam"]) == {"vfm": "dino.pth", "sam": "s.pth"}
    with pytest.raises(InvalidInputError, match="'dino=x'.*roles are vfm, sam"):
        kwargs("--method", "trident", "--vfm-weights", "dino=x")
    with pytest.raises(InvalidInputError, match="role 'sam' twice"):
        kwargs("--method", "trident", "--vfm-weights", "sam=a", "--vfm-weights", "sam=b")
    with pytest.raises(PathNotFoundError, match="'sam_vit_h.pth'"):
        kwargs("--method", "trident", "--vfm-weights", "sam=sam_vit_h.pth")
    assert main(["predict", str(tmp_path / "x.jpg"), "--labels", "a", "--method", "trident",
                 "--vfm-weights", "clip=x"]) == 2


def test_random_vfm_weights_cover_every_role():
    from ovseg.segmenter import _per_role

    assert _per_role("random", ["vfm", "sam"], "vfm_weights") == {"vfm": "random", "sam": "random"}
    assert _per_role("dino.pth", ["vfm", "sam"], "vfm_weights") == {"vfm": "dino.pth"}
