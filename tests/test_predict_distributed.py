"""``ovseg predict`` at scale: torchrun shards the inputs and gives exactly the outputs of one process, with one
merged results.json; --resume predicts only what is missing; outputs mirror the input folders."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg.cli import main
from ovseg.distributed import shard

LABELS = ["--labels", "sky, grass; lawn, road"]
FAST = ["--method", "clip", "--random", "--templates", "single", "--short-side", "32", "--quiet"]


@pytest.fixture
def tree(tmp_path):
    """Five small photos in nested folders (two share the stem 'x')."""
    root = tmp_path / "photos"
    rng = np.random.RandomState(0)
    for k, rel in enumerate(["x.jpg", "x.png", "a/y.jpg", "a/b/z.png", "c/w.jpg"]):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img = np.zeros((36 + 2 * k, 48 + 3 * k, 3), np.uint8)
        img[: img.shape[0] // 2] = rng.randint(0, 255, 3)
        img[img.shape[0] // 2:] = rng.randint(0, 255, 3)
        Image.fromarray(img).save(p)
    return root


def _files(out: Path):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("results.json", "settings.json")}


def test_shards_are_disjoint_and_cover_every_item_once():
    for n in (0, 1, 5, 8):
        for world in (1, 2, 3):
            parts = [shard(n, r, world) for r in range(world)]
            assert sorted(i for p in parts for i in p) == list(range(n))


def test_torchrun_two_processes_equal_one(tree, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = ["-m", "ovseg", "predict", str(tree), "--recursive", *LABELS, *FAST, "--save-probs"]
    one = subprocess.run([sys.executable, *base, "--out", str(tmp_path / "one")], capture_output=True, text=True,
                         env=env, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          *base, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env,
                         timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert sorted(a) == sorted(b) and len(a) == 5 * 3
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]  # byte-identical PNGs and .npy files
    assert {"x_labels.png", "x_1_labels.png", "a/y_labels.png", "a/b/z_labels.png", "c/w_labels.png"} <= set(a)
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert r2["world_size"] == 2 and r2["complete"] and r2["num_images"] == 5
    assert r1["images"] == r2["images"]  # one merged file, in input order, each image once
    assert len({r["file"] for r in r2["images"]}) == 5
    assert r1["key"] == r2["key"]


def test_resume_predicts_only_missing_outputs(tree, tmp_path, monkeypatch, capsys):
    import ovseg.segmenter

    out = tmp_path / "out"
    args = ["predict", str(tree), "--recursive", *LABELS, *FAST, "--out", str(out)]
    assert main(args) == 0
    before = _files(out)
    first = json.loads((out / "results.json").read_text())
    (out / "a" / "y_overlay.png").unlink()  # an interrupted run: one image's outputs are incomplete
    calls = []
    real = ovseg.segmenter.Segmenter.predict
    monkeypatch.setattr(ovseg.segmenter.Segmenter, "predict", lambda self, *a, **k: calls.append(1) or
                        real(self, *a, **k))
    assert main(args + ["--resume"]) == 0
    assert len(calls) == 1
    assert _files(out) == before
    again = json.loads((out / "results.json").read_text())
    assert again["images"] == first["images"] and again["num_reused"] == 4
    # other settings: refused, naming what differs, and nothing is overwritten
    capsys.readouterr()
    assert main(args[:-2] + ["--out", str(out), "--threshold", "0.4", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "settings.options.threshold: 0.0 -> 0.4" in err
    assert _files(out) == before
