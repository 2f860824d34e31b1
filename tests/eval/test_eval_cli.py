"""`ovseg eval` end to end with random weights on a synthetic dataset: reports, resume, and a 2-process
torchrun (gloo, CPU) run equal to the 1-process one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg.cli import main
from ovseg.eval.datasets import SegmentationFolder
from ovseg.eval.metrics import ConfusionMatrix

from .synth import make_dataset

FAST = ["--method", "naclip", "--clip-weights", "random", "--templates", "single", "--short-side", "112",
        "--pamr-steps", "2", "--quiet"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    make_dataset("voc21", root, n=4, size=(40, 52))
    return root


def test_eval_writes_json_markdown_and_matches_predictions(voc, tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["eval", "--dataset", "voc21", "--root", str(voc), "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    r = json.loads((out / "voc21_naclip.json").read_text())
    md = (out / "voc21_naclip.md").read_text()
    assert "voc21 naclip: mIoU" in printed and "| mIoU | mAcc | aAcc |" in md
    opts = r["settings"]["options"]
    assert r["num_images"] == 4 and opts["window"] is None  # NACLIP's VOC21: whole image
    assert opts["threshold"] == 0.1 and opts["short_side"] == 112  # preset + override
    assert r["settings"]["clip"]["weights"] == "random" and len(r["settings"]["clip"]["digest"]) == 16
    assert r["published"]["mIoU"] == 64.1 and r["published"]["source"] == "NACLIP Table 1"
    assert len(r["metrics"]["per_class"]) == 21
    # the reported metrics are exactly those of the written predictions against the ground truth
    ds = SegmentationFolder("voc21", str(voc))
    cm = ConfusionMatrix(21)
    for i, (sid, _, _) in enumerate(ds.samples):
        pred = np.array(Image.open(os.path.join(r["predictions"], f"{sid}.png"))).astype(np.int64)
        cm.update(pred, ds.load_label(i))
    assert cm.compute()["mIoU"] == r["metrics"]["mIoU"]
    assert np.array_equal(np.array(r["confusion_matrix"]), cm.mat.numpy())


def test_resume_reuses_written_predictions(voc, tmp_path, monkeypatch):
    out = tmp_path / "res"
    args = ["eval", "--dataset", "voc21", "--root", str(voc), "--out", str(out), "--limit", "2", *FAST]
    assert main(args) == 0
    first = json.loads((out / "voc21_naclip.json").read_text())
    # an "interrupted" run: one prediction is missing; resume must predict only that one
    preds = sorted(Path(first["predictions"]).glob("*.png"))
    assert Path(first["predictions"]).parent == out / "preds" / "voc21_naclip" and len(preds) == 2
    preds[0].unlink()
    import ovseg.segmenter as segmod

    calls = []
    real = segmod.Segmenter.predict_label_map
    monkeypatch.setattr(segmod.Segmenter, "predict_label_map",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    assert main(args + ["--resume"]) == 0
    assert len(calls) == 1
    again = json.loads((out / "voc21_naclip.json").read_text())
    assert again["metrics"] == first["metrics"] and again["num_images"] == 2
    assert again["prediction_key"] == first["prediction_key"]


@pytest.mark.parametrize("change,needle", [
    (["--short-side", "96"], "settings.options.short_side: 112 -> 96"),
    (["--templates", "identity"], "settings.options.templates"),
    (["--threshold", "0.3"], "settings.options.threshold: 0.1 -> 0.3"),
])
def test_resume_refuses_predictions_made_with_other_settings(voc, tmp_path, capsys, change, needle):
    out = tmp_path / "res"
    args = ["eval", "--dataset", "voc21", "--root", str(voc), "--out", str(out), "--limit", "1", *FAST]
    assert main(args) == 0
    first = json.loads((out / "voc21_naclip.json").read_text())
    capsys.readouterr()
    assert main(args + change + ["--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and needle in err, err
    # without --resume the new settings get their own folder; the earlier predictions stay untouched
    assert main(args + change) == 0
    second = json.loads((out / "voc21_naclip.json").read_text())
    assert second["prediction_key"] != first["prediction_key"]
    assert Path(first["predictions"]).is_dir() and Path(second["predictions"]).is_dir()


def test_prediction_key_covers_weights_and_ignores_execution_details():
    from ovseg.provenance import prediction_key, settings_of

    from ..conftest import make_segmenter

    a = make_segmenter("naclip")
    b = make_segmenter("naclip", seed=1)  # other (random) weights, same everything else
    c = make_segmenter("naclip", batch_size=3)
    ka, keyed = prediction_key(settings_of(a), dataset="voc21")
    assert ka == prediction_key(settings_of(a), dataset="voc21")[0]  # stable
    assert ka != prediction_key(settings_of(b), dataset="voc21")[0]
    assert ka == prediction_key(settings_of(c), dataset="voc21")[0]  # batch size only changes rounding
    assert ka != prediction_key(settings_of(a), dataset="voc20")[0]
    assert json.loads(json.dumps(keyed)) == keyed  # JSON-able


def test_eval_errors(voc, tmp_path, capsys):
    assert main(["eval", "--dataset", "voc12", "--root", str(voc), *FAST]) == 2
    assert "did you mean 'voc21'" in capsys.readouterr().err
    assert main(["eval", "--dataset", "voc21", "--root", str(tmp_path / "missing"), *FAST]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["eval", "--suite", "paper", *FAST]) == 2
    assert "--roots" in capsys.readouterr().err
    assert main(["eval", "--dataset", "pc459", "--root", str(voc), *FAST]) == 2
    assert "no reference settings" in capsys.readouterr().err


def test_suite_table_with_published_numbers(tmp_path, capsys):
    roots = {}
    for name in ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade20k"):
        make_dataset(name, tmp_path / name, n=1, size=(36, 40))
        roots[name] = str(tmp_path / name)
    (tmp_path / "roots.toml").write_text("\n".join(f'{k} = "{v}"' for k, v in roots.items()))
    out = tmp_path / "res"
    assert main(["eval", "--suite", "paper", "--roots", str(tmp_path / "roots.toml"), "--out", str(out), *FAST]) == 0
    table = capsys.readouterr().out
    assert "| dataset | mIoU | published | diff |" in table and "| average |" in table
    assert "| 64.10 |" in table and "| 25.70 |" in table  # NACLIP Table 1 voc21 and coco_stuff
    suite = json.loads((out / "suite_naclip.json").read_text())
    assert [r["dataset"] for r in suite["table"]][-1] == "average" and len(suite["table"]) == 9


def test_torchrun_two_processes_equal_one(voc, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "ovseg", "eval", "--dataset", "voc21", "--root", str(voc), *FAST]
    one = subprocess.run(base + ["--out", str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "ovseg", "eval", "--dataset", "voc21", "--root", str(voc), *FAST,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.loads((tmp_path / "one" / "voc21_naclip.json").read_text())
    r2 = json.loads((tmp_path / "two" / "voc21_naclip.json").read_text())
    assert r2["world_size"] == 2 and r2["num_images"] == r1["num_images"] == 4
    assert r1["confusion_matrix"] == r2["confusion_matrix"]
    assert r1["metrics"] == r2["metrics"]
    # each rank wrote its own, disjoint share of the predictions
    assert len(list(Path(r2["predictions"]).glob("*.png"))) == 4
    assert r1["prediction_key"] == r2["prediction_key"]


_COUNTING_DRIVER = '''
import json, os, sys
from ovseg import cache, text
counts = {"encoded": 0, "disk_reads": 0}
encode, get_many = text.TextClassifier._encode, cache.TextEmbeddingCache.get_many
def _encode(self, queries, templates, progress):
    counts["encoded"] += len(queries)
    return encode(self, queries, templates, progress)
def _get_many(self, key, templates, queries):
    queries = list(queries)
    counts["disk_reads"] += len(queries)
    return get_many(self, key, templates, queries)
text.TextClassifier._encode, cache.TextEmbeddingCache.get_many = _encode, _get_many
from ovseg.cli import main
rc = main(sys.argv[2:])
with open(os.path.join(sys.argv[1], "counts_%s.json" % os.environ.get("RANK", "0")), "w") as f:
    json.dump(counts, f)
sys.exit(rc)
'''


def test_torchrun_encodes_the_queries_once_and_shares_them(voc, tmp_path):
    """Rank 0 encodes each query once (the disk cache serves a second run); rank 1 gets the embeddings by broadcast
    and neither encodes nor reads the disk cache."""
    from ovseg.eval.presets import get_eval_preset, read_class_file

    preset = get_eval_preset("naclip", "voc21")
    n_queries = len(set(read_class_file(preset.class_file, preset.separator).queries))
    driver = tmp_path / "driver.py"
    driver.write_text(_COUNTING_DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", OVSEG_HOME=str(tmp_path / "home"))
    for run, expected_rank0 in (("first", {"encoded": n_queries, "disk_reads": n_queries}),
                                ("second", {"encoded": 0, "disk_reads": n_queries})):
        counts = tmp_path / run
        counts.mkdir()
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            str(driver), str(counts), "eval", "--dataset", "voc21", "--root", str(voc), *FAST,
                            "--limit", "2"], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads((counts / "counts_0.json").read_text()) == expected_rank0, run
        assert json.loads((counts / "counts_1.json").read_text()) == {"encoded": 0, "disk_reads": 0}, run
