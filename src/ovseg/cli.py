"""``ovseg`` command line: ``predict``, ``list``, ``doctor``, ``eval``, ``convert-coco-object``, ``demo``.

Errors from bad input print one line on stderr and exit with code 2.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from . import __version__
from .errors import PathNotFoundError

__all__ = ["main", "build_parser", "parse_label_text", "find_images"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


def parse_label_text(text: str) -> List[str]:
    """``"cat, sofa; couch, floor"`` -> ``["cat", "sofa; couch", "floor"]`` (empty items are kept so that
    the label parser can reject them with a clear message)."""
    if not text.strip():
        raise ValueError("--labels is empty; give comma-separated labels, e.g. --labels \"cat, sofa; couch\"")
    return [part.strip() for part in text.split(",")]


def read_label_file(path: str) -> List[str]:
    """One class per line (``;`` separates synonyms); blank lines and ``#`` comments are skipped."""
    p = Path(path)
    if not p.is_file():
        raise PathNotFoundError(f"--labels-file: file not found: '{path}'")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    labels = [ln for ln in lines if ln and not ln.startswith("#")]
    if not labels:
        raise ValueError(f"--labels-file '{path}' has no labels")
    return labels


def find_images(inputs: Sequence[str], recursive: bool = False) -> List[Path]:
    """Files, folders (their images, sorted) and globs -> image paths. A missing path is an error."""
    found: List[Path] = []
    for item in inputs:
        p = Path(os.path.expanduser(item))
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            imgs = sorted(f for f in it if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not imgs:
                raise ValueError(f"folder '{item}' contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found.extend(imgs)
        elif p.is_file():
            found.append(p)
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(item), recursive=True)
                             if Path(m).is_file() and Path(m).suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise PathNotFoundError(f"no images match '{item}'")
            found.extend(matches)
        else:
            raise PathNotFoundError(f"image path not found: '{item}'")
    return found


def _unique_stems(paths: Sequence[Path]) -> List[str]:
    seen, stems = {}, []
    for p in paths:
        stem = p.stem
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        stems.append(stem if n == 0 else f"{stem}_{n}")
    return stems


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--method", default="proxyclip",
                   help="proxyclip (default), naclip, sclip, clearclip, maskclip, clip")
    g.add_argument("--clip", default=None, help="open_clip architecture (default ViT-B-16)")
    g.add_argument("--clip-weights", default=None,
                   help="open_clip pretrained tag (default openai), a local checkpoint file or folder, or 'random'")
    g.add_argument("--clip-tag", default=None,
                   help="the open_clip pretrained tag a local --clip-weights file holds (e.g. openai); it decides "
                        "the activation (QuickGELU or GELU)")
    g.add_argument("--vfm", default=None, help="VFM for proxyclip (default dino_b8); see 'ovseg list'")
    g.add_argument("--vfm-weights", default=None, help="local checkpoint in the official release format, or 'random'")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    g.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"])
    o = p.add_argument_group("inference options (default: the method's preset)")
    o.add_argument("--window", type=int, default=None, help="window size in pixels; 0 = whole image")
    o.add_argument("--stride", type=int, default=None)
    o.add_argument("--short-side", type=int, default=None, help="resize the shorter side to this (default 336)")
    o.add_argument("--threshold", type=float, default=None, help="low-confidence pixels go to the first label")
    o.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    o.add_argument("--pamr-steps", type=int, default=None, help="PAMR iterations (naclip: 10; 0 disables)")
    o.add_argument("--templates", default=None,
                   help="prompt templates: openai_imagenet (80, default), simple_imagenet (7), single, or a text "
                        "file with one template containing {} per line")


def _segmenter(args: argparse.Namespace):
    from .segmenter import Segmenter

    return Segmenter(args.method, clip=args.clip, clip_weights=args.clip_weights, clip_tag=args.clip_tag, vfm=args.vfm,
                     vfm_weights=args.vfm_weights, device=args.device, precision=args.precision,
                     window=args.window, stride=args.stride, short_side=args.short_side,
                     batch_size=args.batch_size, pamr_steps=args.pamr_steps, templates=_templates(args.templates))


def _templates(value: Optional[str]):
    if value is None or not os.path.isfile(value):
        return value
    lines = [ln.strip() for ln in Path(value).read_text(encoding="utf-8").splitlines()]
    return tuple(ln for ln in lines if ln and not ln.startswith("#"))


def _cmd_predict(args: argparse.Namespace) -> int:
    from .text import parse_labels

    if (args.labels is None) == (args.labels_file is None):
        raise ValueError("give exactly one of --labels \"a, b; c\" or --labels-file FILE")
    raw = parse_label_text(args.labels) if args.labels is not None else read_label_file(args.labels_file)
    labelset = parse_labels(raw)  # validate before loading any model
    images = find_images(args.images, recursive=args.recursive)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    seg = _segmenter(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    progress = not args.quiet
    iterator = zip(images, _unique_stems(images))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(list(iterator), desc="images", unit="img", file=sys.stderr)
    for path, stem in iterator:
        res = seg.predict(str(path), labelset, threshold=args.threshold, return_probs=args.save_probs)
        paths = res.save(out, stem, save_probs=args.save_probs, alpha=args.alpha)
        records.append({
            "file": str(path), "height": res.size[0], "width": res.size[1],
            **{f"{k}_{'npy' if k == 'probs' else 'png'}": os.path.relpath(v, out) for k, v in paths.items()},
            "fractions": {k: round(v, 6) for k, v in res.fractions().items()},
        })
    summary = {
        "ovseg": __version__, "method": seg.cfg.name, "clip": seg.cfg.clip, "clip_weights": seg.clip.weights,
        "clip_activation": seg.clip.activation, "clip_identity": seg.clip.identity,
        "vfm": seg.cfg.vfm, "labels": list(labelset.names), "queries": list(labelset.queries), "images": records,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    if not args.quiet:
        print(f"wrote {len(records)} result(s) to {out}/ (results.json)", file=sys.stderr)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .attention import describe_attentions
    from .backbones import describe_vfms, list_clip_architectures
    from .methods import METHODS

    def section(title, rows):
        print(f"{title}:")
        for name, doc in rows:
            print(f"  {name:<16} {doc}")

    section("methods", METHODS.describe().items())
    section("vfms (for proxyclip)", describe_vfms().items())
    section("attentions", describe_attentions().items())
    import open_clip

    archs = set(list_clip_architectures())
    tags = {}
    for arch, tag in open_clip.list_pretrained():
        if arch in archs:
            tags.setdefault(arch, []).append(tag)
    section("clip architectures (open_clip) and pretrained tags",
            [(a, ", ".join(t)) for a, t in sorted(tags.items())])
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    import importlib.metadata as md

    import torch

    print(f"ovseg {__version__} | python {platform.python_version()} | {platform.platform()}")
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__} | CUDA build: {torch.version.cuda or 'none'} | CUDA available: {cuda}")
    for i in range(torch.cuda.device_count() if cuda else 0):
        print(f"  cuda:{i} {torch.cuda.get_device_name(i)}")
    mps = getattr(torch.backends, "mps", None)
    print(f"MPS available: {bool(mps and mps.is_available())} | CPU threads: {torch.get_num_threads()} | "
          f"CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    print(f"default device: {'cuda' if cuda else 'cpu'} | default precision: {'fp16' if cuda else 'fp32'}")
    print("packages:")
    for pkg, extra in (("open_clip_torch", ""), ("timm", ""), ("torchvision", ""), ("huggingface_hub", ""),
                       ("safetensors", ""), ("numpy", ""), ("pillow", ""), ("diffusers", "sd"),
                       ("transformers", "sd")):
        try:
            ver = md.version(pkg)
        except md.PackageNotFoundError:
            ver = f'not installed (pip install "ovseg[{extra}]")' if extra else "NOT INSTALLED"
        print(f"  {pkg:<16} {ver}")
    from huggingface_hub import constants

    offline = bool(getattr(constants, "HF_HUB_OFFLINE", False))
    print(f"hugging face cache: {constants.HF_HUB_CACHE} | HF_HUB_OFFLINE: {int(offline)}")
    cached = _cached_repos()
    print("weights in the local cache:")
    for kind, name, repo, note in _known_weights():
        state = "cached" if repo in cached else "not cached"
        print(f"  {kind:<5} {name:<34} {repo:<48} {state:<11} {note}".rstrip())
    return 0


def _cached_repos() -> set:
    try:
        from huggingface_hub import scan_cache_dir

        return {r.repo_id for r in scan_cache_dir().repos}
    except Exception:  # no cache yet
        return set()


def _known_weights():
    """(kind, name, hub repo, note) for the CLIP weights ovseg names (note: their activation) and every registered
    VFM with a hub source."""
    import open_clip

    from .backbones import VFMS, get_vfm_cfg
    from .backbones.clip_weights import KNOWN_CLIP_WEIGHTS, tag_activation

    rows = []
    for arch, tag in KNOWN_CLIP_WEIGHTS:
        cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
        rows.append(("clip", f"{arch}/{tag}", cfg.get("hf_hub", "").rstrip("/"),
                     f"activation: {tag_activation(arch, tag)}"))
    for name in VFMS.names():
        cfg = get_vfm_cfg(name)
        repo = cfg.hub_repo if cfg is not None else None
        if repo:
            rows.append(("vfm", name, repo, ""))
    return rows


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval.datasets import get_dataset_spec
    from .eval.runner import init_distributed, read_roots, run_eval, run_suite

    if args.suite is None and (args.dataset is None or args.root is None):
        raise ValueError("give --dataset NAME --root PATH, or --suite paper --roots roots.toml")
    if args.suite is not None and args.roots is None:
        raise ValueError("--suite paper needs --roots roots.toml (dataset = \"/path/to/root\" per line)")
    if args.dataset is not None:
        get_dataset_spec(args.dataset)  # validate the name before loading any model
    roots = read_roots(args.roots) if args.suite else None
    rank, world, args.device = init_distributed(args.device)
    seg = _segmenter(args)  # dataset presets, then these overrides, are applied per dataset by configure()
    overrides = {"window": args.window, "stride": args.stride, "short_side": args.short_side,
                 "threshold": args.threshold}
    common = dict(out_dir=args.out, resume=args.resume, limit=args.limit, strict_ignore=args.strict_ignore,
                  overrides=overrides, progress=not args.quiet, rank=rank, world=world)
    try:
        if args.suite:
            suite = run_suite(seg, roots, **common)
            if suite is not None:
                print(suite["markdown"])
        else:
            r = run_eval(seg, args.dataset, args.root, **common)
            if r is not None:
                m = r["metrics"]
                pub = r.get("published")
                extra = f" | published {pub['mIoU']:.2f} ({pub['source']}), diff {pub['diff']:+.2f}" if pub and \
                    pub["diff"] is not None else ""
                print(f"{args.dataset} {r['method']}: mIoU {m['mIoU']} | mAcc {m['mAcc']} | aAcc {m['aAcc']}{extra}")
                if args.out:
                    print(f"wrote {args.out}/{args.dataset}_{r['method']}.json and .md", file=sys.stderr)
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


def _cmd_convert_coco_object(args: argparse.Namespace) -> int:
    from .eval.coco_object import convert_coco_object

    n = convert_coco_object(args.root, splits=args.splits, out_dir=args.out, progress=not args.quiet)
    print(f"wrote {n} COCO-Object label maps (*_instanceTrainIds.png)", file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import launch_demo

    def factory(method: str, vfm: Optional[str], vfm_weights: Optional[str]):  # the UI's choice + these options
        return _segmenter(argparse.Namespace(**{**vars(args), "method": method, "vfm": vfm,
                                                "vfm_weights": vfm_weights}))

    return launch_demo(host=args.host, port=args.port, share=args.share, method=args.method, vfm=args.vfm,
                       clip=args.clip, clip_weights=args.clip_weights, vfm_weights=args.vfm_weights,
                       threshold=args.threshold, factory=factory)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovseg", description="Training-free open-vocabulary semantic segmentation.")
    parser.add_argument("--version", action="version", version=f"ovseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{predict,list,doctor,eval,convert-coco-object,demo}")
    p = sub.add_parser("predict", help="segment images with a list of words",
                       description="Segment images (files, folders or globs) with any labels.")
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--labels", default=None, help='comma-separated, ";" between synonyms: "cat, sofa; couch, floor"')
    p.add_argument("--labels-file", default=None, help="one label per line (';' between synonyms)")
    p.add_argument("--out", default="out", help="output folder (default: out/)")
    p.add_argument("--save-probs", action="store_true", help="also write <stem>_probs.npy (C, H, W) float32")
    p.add_argument("--alpha", type=float, default=0.5, help="mask opacity in the overlay (default 0.5)")
    p.add_argument("--recursive", action="store_true", help="search folders recursively")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_args(p)
    p.set_defaults(func=_cmd_predict)
    s = sub.add_parser("list", help="methods, VFMs, attentions, CLIP architectures and pretrained tags")
    s.set_defaults(func=_cmd_list)
    d = sub.add_parser("doctor", help="environment, devices, package versions and cached weights")
    d.set_defaults(func=_cmd_doctor)
    e = sub.add_parser("eval", help="mIoU on a benchmark (or the papers' suite), single process or torchrun",
                       description="Evaluate a method with the reference settings of each dataset. Under torchrun "
                                   "the dataset is sharded over processes.")
    e.add_argument("--dataset", default=None, help="voc21, voc20, context60, context59, coco_object, coco_stuff, "
                                                   "cityscapes, ade20k, ade847, pc459")
    e.add_argument("--root", default=None, help="the dataset folder, prepared as MMSegmentation does")
    e.add_argument("--suite", default=None, choices=["paper"], help="the eight datasets of the papers' tables")
    e.add_argument("--roots", default=None, help="roots.toml: one 'dataset = \"path\"' line per dataset")
    e.add_argument("--out", default=None, help="folder for <dataset>_<method>.json/.md and predicted PNGs")
    e.add_argument("--resume", action="store_true", help="reuse predictions already written under --out")
    e.add_argument("--limit", type=int, default=None, help="only the first N images (smoke tests)")
    e.add_argument("--strict-ignore", action="store_true",
                   help="also ignore labels outside [0, C) (the references count them; see docs/evaluation.md)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_args(e)
    e.set_defaults(func=_cmd_eval)
    c = sub.add_parser("convert-coco-object", help="make COCO-Object labels from COCO-Stuff-164k")
    c.add_argument("root", help="the coco_stuff164k folder (annotations/<split>/*.png)")
    c.add_argument("--splits", nargs="+", default=["val2017"])
    c.add_argument("--out", default=None, help="output root (default: the same folder)")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_cmd_convert_coco_object)
    w = sub.add_parser("demo", help='a web demo in the browser (pip install "ovseg[demo]")',
                       description="Serve a Gradio web demo: upload an image, type labels, pick the method and VFM. "
                                   "The options below set the weights and the initial choice; see docs/demo.md.")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    w.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    w.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default)")
    _add_model_args(w)
    w.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("ovseg: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, ImportError, RuntimeError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"ovseg: error: {msg}", file=sys.stderr)
        return 2
