"""Command line: ``ovseg list`` and ``ovseg predict`` (a fuller CLI is planned, see the issues)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ["main"]


def _cmd_list(args: argparse.Namespace) -> int:
    from .attention import describe_attentions
    from .backbones import describe_vfms
    from .methods import METHODS

    print("methods:")
    for name, doc in METHODS.describe().items():
        print(f"  {name:<12} {doc}")
    print("vfms:")
    for name, doc in describe_vfms().items():
        print(f"  {name:<12} {doc}")
    print("attentions:")
    for name, doc in describe_attentions().items():
        print(f"  {name:<12} {doc}")
    return 0


def _split_labels(text: str) -> List[str]:
    return [part for part in (p.strip() for p in text.split(",")) if part]


def _cmd_predict(args: argparse.Namespace) -> int:
    from .segmenter import Segmenter

    labels = _split_labels(args.labels)
    seg = Segmenter(args.method, clip=args.clip, clip_weights=args.clip_weights, vfm=args.vfm,
                    vfm_weights=args.vfm_weights, device=args.device, precision=args.precision)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for path in args.images:
        res = seg.predict(path, labels, progress=True)
        stem = Path(path).stem
        res.overlay().save(out / f"{stem}_overlay.png")
        from PIL import Image

        Image.fromarray(res.color_mask()).save(out / f"{stem}_mask.png")
        summary.append({"file": str(path), "labels": res.labels, "fractions": res.fractions()})
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovseg", description="training-free open-vocabulary segmentation")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="methods, VFMs and attention strategies")
    p_list.set_defaults(func=_cmd_list)
    p = sub.add_parser("predict", help="segment images with a list of labels")
    p.add_argument("images", nargs="+")
    p.add_argument("--labels", required=True, help='comma-separated, ";" for synonyms: "cat, sofa; couch"')
    p.add_argument("--method", default="proxyclip")
    p.add_argument("--clip", default=None)
    p.add_argument("--clip-weights", default=None)
    p.add_argument("--vfm", default=None)
    p.add_argument("--vfm-weights", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"])
    p.add_argument("--out", default="out")
    p.set_defaults(func=_cmd_predict)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError, RuntimeError) as e:
        print(f"ovseg: error: {e}", file=sys.stderr)
        return 2
