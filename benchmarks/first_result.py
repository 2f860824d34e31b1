"""Time to first result: a fresh process's first ``predict`` against a warm one.

    python benchmarks/first_result.py --repeats 3
    python benchmarks/first_result.py --repeats 1 --baseline   # also: open_clip's full 77-token text tower, no cache

What is timed. Each repeat uses a new, empty ``OVSEG_HOME`` and starts two fresh Python processes one after the
other (NACLIP, ViT-B/16 with seeded random weights, fp32, the 80 default templates, 5 labels, a 500x375 picture):

* ``cold``: the first ``Segmenter.predict`` call of the first process (empty text cache: encodes 5 x 80 prompts,
  writes the cache), then ``--warm`` more calls;
* ``cached``: the first ``predict`` of the second process (the text embeddings come from the disk cache), then the
  warm calls.

``warm`` is the median of the warm calls of both processes (same labels: text embeddings in memory). Import and
model construction are reported separately and are not part of any ratio; "text s" is the time spent in the text
classifier during the first call. The ratios ``cold / warm`` and ``cached / warm`` are medians over the repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

LABELS = ["person", "dog", "grass", "sky", "car"]


def _child(args) -> None:
    t0 = time.perf_counter()
    import numpy as np  # noqa: F401
    import torch

    import ovseg
    from ovseg import Segmenter

    t_import = time.perf_counter() - t0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench import test_image

    img = test_image(500, 375)
    t0 = time.perf_counter()
    seg = Segmenter("naclip", clip_weights="random", precision="fp32", device="cpu")
    t_build = time.perf_counter() - t0
    if args.baseline:  # the 0.1.0 text path: open_clip's encode_text on 77 tokens, no disk cache
        seg.clip.encode_text = seg.clip.model.encode_text
        seg.text.disk_cache = False
    text_s = []

    class _Timed:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, *a, **k):
            t = time.perf_counter()
            out = self.inner(*a, **k)
            text_s.append(time.perf_counter() - t)
            return out

    seg.text = _Timed(seg.text)
    times = []
    for _ in range(1 + args.warm):
        t = time.perf_counter()
        seg.predict(img, LABELS)
        times.append(time.perf_counter() - t)
    print(json.dumps({"import_s": t_import, "build_s": t_build, "first_s": times[0], "warm_s": times[1:],
                      "text_first_s": text_s[0], "info": seg.text.cache_info(), "ovseg": ovseg.__file__,
                      "threads": torch.get_num_threads()}))


def _run(env, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--warm", str(args.warm)]
    if args.baseline:
        cmd.append("--baseline")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warm", type=int, default=3, help="warm predict calls per process")
    ap.add_argument("--baseline", action="store_true", help="open_clip's full-length text tower and no disk cache")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    import torch

    from ovseg.precision import cpu_capability_line

    print(cpu_capability_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="ovseg-home-") as home:
            env = dict(os.environ, OVSEG_HOME=home)
            cold = _run(env, args)
            cached = _run(env, args)
        warm = statistics.median(cold["warm_s"] + cached["warm_s"])
        row = {"cold_s": cold["first_s"], "cached_s": cached["first_s"], "warm_s": warm,
               "cold_text_s": cold["text_first_s"], "cached_text_s": cached["text_first_s"],
               "cold_ratio": cold["first_s"] / warm, "cached_ratio": cached["first_s"] / warm,
               "import_s": cold["import_s"], "build_s": cold["build_s"],
               "cached_disk_hits": cached["info"]["disk_hits"], "cold_encoded": cold["info"]["encoded"]}
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"\nmedians over {len(rows)} repeat(s)" + (" [baseline: open_clip full-length text, no cache]"
                                                     if args.baseline else ""))
    print("| first predict, empty cache | first predict, cache filled | warm predict | cold / warm | cached / warm "
          "| text s (cold) | text s (cached) | import s | build s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {med['cold_s']:.2f} s | {med['cached_s']:.2f} s | {med['warm_s']:.2f} s | {med['cold_ratio']:.2f}x | "
          f"{med['cached_ratio']:.2f}x | {med['cold_text_s']:.2f} | {med['cached_text_s']:.2f} | "
          f"{med['import_s']:.2f} | {med['build_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
