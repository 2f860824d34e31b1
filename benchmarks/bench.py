"""ovseg speed benchmark: seconds per image, windows/s, peak memory, model FLOPs per window, and efficiency
(achieved FLOP/s of the model forward / dense-matmul FLOP/s measured in the same run, device and precision).

    python benchmarks/bench.py --method proxyclip --vfm dino_b8 --sizes 336x336 500x375 1024x768 --precision fp32
    python benchmarks/bench.py --all --out benchmarks/results.md

Models are built with seeded random weights (speed does not depend on weight values). Each configuration is
warmed up, then timed over ``--runs`` predictions; the model forward (all windows) is timed separately from the
rest (pre-processing, resize back, PAMR, softmax). Peak memory is the process's peak RSS during the timed runs
(Linux VmHWM, reset before each configuration) or CUDA's max allocated memory.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ovseg import Segmenter

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, precision: str, n: int = 2048, reps: int = 10) -> float:
    """Dense matmul FLOP/s for this device and precision (the efficiency denominator)."""
    dt = DTYPES[precision]
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    for _ in range(3):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / best


def reset_peak(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak RSS)
        except OSError:
            pass


def peak_mb(device: str) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_image(w: int, h: int) -> np.ndarray:
    """A structured picture (regions, edges, texture) rather than noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(xx / 37.0), 128 + 100 * np.cos(yy / 23.0), (xx + yy) % 255], -1)
    img[h // 4: h // 2, w // 5: w // 2] = (230, 40, 40)
    img[int(h * 0.6):, :] = (60, 150, 60)
    return np.clip(img, 0, 255).astype(np.uint8)


class ForwardTimer:
    """Times the dense model on every window batch and records window shapes, by wrapping
    ``seg.model.window_logits`` (what ``predict`` calls; strategies that override ``window_logits`` never go
    through ``model.forward``, so forward hooks would miss them)."""

    def __init__(self, seg: Segmenter):
        self.seg = seg
        self.reset()
        model = seg.model
        inner = model.window_logits

        def timed(crops, *args, **kwargs):
            _sync(self.seg.device)
            t = time.perf_counter()
            self.windows += crops.shape[0]
            self.shapes.extend([tuple(crops.shape[1:])] * crops.shape[0])
            out = inner(crops, *args, **kwargs)
            _sync(self.seg.device)
            self.seconds += time.perf_counter() - t
            return out

        model.window_logits = timed

    def reset(self):
        self.seconds, self.windows, self.shapes = 0.0, 0, []

    def remove(self):
        self.seg.model.__dict__.pop("window_logits", None)


def test_regions(h: int, w: int) -> np.ndarray:
    """Region masks of ``test_image`` (its two painted blocks; 0 elsewhere), for mask-guided methods."""
    regions = np.zeros((h, w), np.int64)
    regions[h // 4: h // 2, w // 5: w // 2] = 1
    regions[int(h * 0.6):, :] = 2
    return regions


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu`` (query/key/value shapes (B, H, L, D)):
    QK^T and AV, 2 FLOPs per multiply-add, as torch counts its GPU attention kernels. torch's counter has no formula
    for this CPU kernel and counts it as 0 (timm's ViTs use it), which understated VFM-guided methods' FLOPs."""
    b, h, lq, d = query
    lk, dv = key[-2], value[-1]
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv


def flops_per_window(seg: Segmenter, shape, text: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from ovseg.strategies import WindowContext

    x = torch.zeros((1,) + tuple(shape), device=seg.device)
    context = WindowContext(text=text)
    if getattr(seg.model.strategy, "uses_masks", False):  # a window's region map (two regions)
        regions = torch.zeros((1, 1) + tuple(shape[1:]), dtype=torch.int64, device=seg.device)
        regions[..., : shape[1] // 2, :] = 1
        context.aux["regions"] = regions
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the counter cannot see inside the fused MHA kernel
    try:
        with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_SDPA) as fc, seg._autocast():
            seg.model(x, text=text, context=context)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return float(fc.get_total_flops())


_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)  # absent in old torch
_SDPA = {_CPU_SDPA: _cpu_sdpa_flops} if _CPU_SDPA is not None else {}


def build(method: str, vfm: Optional[str], precision: str, device: str, masks: str = "generated",
          **opts) -> Segmenter:
    from ovseg.methods import get_method

    kw = dict(clip_weights="random", templates="single", precision=precision, device=device, **opts)
    cfg = get_method(method)
    if "vfm" not in cfg.strategy_cls.vfm_roles(cfg.strategy_options):
        vfm = None  # --vfm (default dino_b8) only applies to methods with a 'vfm' role
    roles = cfg.replace(vfm=vfm).vfm_names()
    if roles:  # every VFM the method uses, with random weights
        kw.update(vfm=vfm, vfm_weights={role: "random" for role in roles})
    if "mask_generator" in get_method(method).option_names():  # given masks, or the preset's generator (random)
        if masks == "given":
            kw["mask_generator"] = "none"
        else:
            kw["mask_weights"] = "random"
    return Segmenter(method, **kw)


def bench_config(seg: Segmenter, size: Tuple[int, int], runs: int, warmup: int, labels: List[str],
                 peak: float, ref: Optional[Segmenter] = None) -> Dict:
    w, h = size
    img = test_image(w, h)
    given = getattr(seg.model.strategy, "uses_masks", False) and getattr(seg.strategy, "mask_generator", 0) is None
    masks = test_regions(h, w) if given else None  # mask-guided methods: given masks, or their generator runs
    timer = ForwardTimer(seg)
    for _ in range(warmup):
        seg.predict(img, labels, masks=masks)
    reset_peak(str(seg.device))
    base_mb = peak_mb(str(seg.device))
    totals, models = [], []
    for _ in range(runs):
        timer.reset()
        _sync(seg.device)
        t = time.perf_counter()
        res = seg.predict(img, labels, masks=masks)
        _sync(seg.device)
        totals.append(time.perf_counter() - t)
        models.append(timer.seconds)
    mem = peak_mb(str(seg.device))
    windows = timer.windows
    shapes = {s: timer.shapes.count(s) for s in set(timer.shapes)}
    timer.remove()
    text = seg.text_embeddings(labels)
    flops = sum(n * flops_per_window(seg, s, text) for s, n in shapes.items())
    model_s = statistics.median(models)
    row = {
        "method": seg.cfg.name, "vfm": seg.cfg.vfm, "size": f"{w}x{h}", "precision": seg.precision,
        "windows": windows, "window_shapes": {f"{s[1]}x{s[2]}": n for s, n in shapes.items()},
        "s_per_image": statistics.median(totals), "model_s": model_s,
        "post_s": statistics.median(totals) - model_s, "windows_per_s": windows / model_s,
        "gflop_per_window": flops / windows / 1e9, "achieved_gflops": flops / model_s / 1e9,
        "peak_gflops": peak / 1e9, "efficiency": flops / model_s / peak, "peak_rss_mb": mem,
        "rss_before_mb": base_mb,
    }
    if getattr(seg.model.strategy, "uses_masks", False):
        gen = getattr(seg.strategy, "mask_generator", None)
        row["masks"] = "given" if given else getattr(gen, "name", type(gen).__name__)
    if ref is not None:
        ref_res = ref.predict(img, labels, masks=masks)
        row["agreement_vs_fp32"] = float((ref_res.label_map == res.label_map).mean())
    return row


def markdown(rows: List[Dict], header: str) -> str:
    out = [header, "",
           "| method | VFM | image | precision | windows | s/image | model s | post s | windows/s | GFLOP/window |"
           " achieved GFLOP/s | matmul GFLOP/s | efficiency | peak RSS MB | peak - models MB | agree vs fp32 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        agree = f"{100 * r['agreement_vs_fp32']:.2f}%" if "agreement_vs_fp32" in r else "-"
        method = r["method"] + (f" ({r['masks']} masks)" if r.get("masks") else "")
        out.append(f"| {method} | {r['vfm'] or '-'} | {r['size']} | {r['precision']} | {r['windows']} | "
                   f"{r['s_per_image']:.2f} | {r['model_s']:.2f} | {r['post_s']:.2f} | {r['windows_per_s']:.2f} | "
                   f"{r['gflop_per_window']:.1f} | {r['achieved_gflops']:.1f} | {r['peak_gflops']:.1f} | "
                   f"{r['efficiency']:.2f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['rss_before_mb']:.0f} | "
                   f"{agree} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="proxyclip")
    ap.add_argument("--vfm", default="dino_b8")
    ap.add_argument("--sizes", nargs="+", default=["336x336", "500x375", "1024x768"], help="WIDTHxHEIGHT")
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=list(DTYPES))
    ap.add_argument("--all", action="store_true", help="every method, fp32 and bf16 (fp16 on CUDA)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--labels", type=int, default=8, help="number of text labels")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--memory-budget", type=float, default=None, help="GB for one window batch")
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbones")
    ap.add_argument("--device", default=None)
    ap.add_argument("--masks", default="generated", choices=["generated", "given"],
                    help="mask-guided methods (corrclip): run the preset's mask generator (random weights) or give "
                         "precomputed masks (the generator's time excluded)")
    ap.add_argument("--out", default=None, help="write a Markdown table (and a .json beside it)")
    ap.add_argument("--json-rows", default=None, help=argparse.SUPPRESS)  # used by --all's subprocesses
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    methods = ["proxyclip", "naclip", "sclip", "clearclip", "maskclip", "clip"] if args.all else [args.method]
    precisions = (["fp32", "fp16" if device.startswith("cuda") else "bf16"] if args.all else args.precision)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    labels = [f"label {i}" for i in range(args.labels)]
    from ovseg.precision import cpu_capability_line, resolve_precision

    auto = "" if device == "cpu" else f" | precision \"auto\" on {device}: {resolve_precision('auto', device)}"
    print(cpu_capability_line() + auto, flush=True)
    peaks = {p: matmul_peak(device, p) for p in precisions}
    rows = []
    opts = {k: v for k, v in (("batch_size", args.batch_size), ("memory_budget", args.memory_budget),
                              ("compile", args.compile or None)) if v is not None}
    if args.all:  # one process per method, so that each peak-memory figure is that method's alone
        import subprocess
        import tempfile

        passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--all",)]
        if "--out" in passthrough:
            i = passthrough.index("--out")
            del passthrough[i:i + 2]
        for method in methods:
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                cmd = [sys.executable, os.path.abspath(__file__), "--method", method, "--precision", *precisions,
                       "--json-rows", tmp.name, *passthrough]
                subprocess.run(cmd, check=True)
                rows.extend(json.load(open(tmp.name)))
        methods = []
    for method in methods:
        ref = build(method, args.vfm, "fp32", device, args.masks, **opts) if "fp32" not in precisions[:1] else None
        for precision in precisions:
            seg = build(method, args.vfm, precision, device, args.masks, **opts)
            if precision == "fp32":
                ref = seg
            for size in sizes:
                row = bench_config(seg, size, args.runs, args.warmup, labels, peaks[precision],
                                   ref if precision != "fp32" else None)
                rows.append(row)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
    if args.json_rows:
        with open(args.json_rows, "w") as f:
            json.dump(rows, f)
        return 0
    cmd = "python benchmarks/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"Measured with `{cmd}` on {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {device}; random weights, "
              f"{args.labels} labels, {args.runs} timed runs after {args.warmup} warm-up.\n\n"
              f"{cpu_capability_line()}{auto}.")
    table = markdown(rows, header)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
