"""``ovseg`` command line: ``predict``, ``list``, ``doctor``, ``eval``, ``cache``, ``convert-coco-object``,
``demo``.

Exit codes: 0 success; 2 a user error (an :class:`~ovseg.errors.OvsegError` or a bad argument), printed as one
line on stderr, checked before any model is built where possible; 3 ``predict`` finished but some inputs failed
(listed in ``results.json``); 130 interrupted. Any other exception is a bug and keeps its traceback (exit 1).
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from . import __version__
from .errors import InvalidInputError, InvalidTypeError, OvsegError, PathNotFoundError

__all__ = ["main", "build_parser", "parse_label_text", "find_images", "EXIT_USER_ERROR", "EXIT_PARTIAL"]

EXIT_USER_ERROR = 2  # bad arguments or input: one line on stderr
EXIT_PARTIAL = 3  # ovseg predict: finished, but some inputs failed (listed in results.json)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


def parse_label_text(text: str) -> List[str]:
    """``"cat, sofa; couch, floor"`` -> ``["cat", "sofa; couch", "floor"]`` (empty items are kept so that
    the label parser can reject them with a clear message)."""
    if not text.strip():
        raise InvalidInputError("--labels is empty; give comma-separated labels, e.g. --labels \"cat, sofa; couch\"")
    return [part.strip() for part in text.split(",")]


def _glob_base(pattern: str) -> Path:
    """The folder part of a glob pattern before its first wildcard (``shots/**/*.jpg`` -> ``shots``)."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if any(ch in part for ch in "*?["):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def collect_images(inputs: Sequence[str], recursive: bool = False) -> List[Tuple[Path, str]]:
    """Files, folders (their images, sorted) and globs -> ``(image path, output stem)`` pairs.

    The output stem mirrors the input's place: relative to the folder given (``photos/a/b.jpg`` from
    ``photos/`` -> ``a/b``), to a glob's fixed folder part, or the bare stem for a file. A file reached twice is
    kept once; two inputs that would share a stem get ``_1``, ``_2``, ... A missing path is an error.
    """
    found: List[Tuple[Path, Path]] = []  # (path, relative path without suffix)
    for item in inputs:
        p = Path(os.path.expanduser(item))
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            imgs = sorted(f for f in it if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not imgs:
                raise InvalidInputError(f"folder '{item}' contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
                                        + ("" if recursive else "; --recursive searches sub-folders"))
            found.extend((f, f.relative_to(p).with_suffix("")) for f in imgs)
        elif p.is_file():
            found.append((p, Path(p.stem)))
        elif any(ch in item for ch in "*?["):
            pattern = os.path.expanduser(item)
            base = _glob_base(pattern)
            matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True)
                             if Path(m).is_file() and Path(m).suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise PathNotFoundError(f"no images match '{item}'")
            found.extend((m, m.relative_to(base).with_suffix("")) for m in matches)
        else:
            raise PathNotFoundError(f"image path not found: '{item}'")
    out: List[Tuple[Path, str]] = []
    seen_files, used = set(), set()
    for path, rel in found:
        key = os.path.realpath(path)
        if key in seen_files:
            continue  # the same file given twice (or through a folder and a glob) is processed once
        seen_files.add(key)
        stem, n = rel.as_posix(), 0
        while stem.lower() in used:
            n += 1
            stem = f"{rel.as_posix()}_{n}"
        used.add(stem.lower())
        out.append((path, stem))
    return out


def find_images(inputs: Sequence[str], recursive: bool = False) -> List[Path]:
    """Files, folders (their images, sorted) and globs -> image paths, each file once. A missing path is an error."""
    return [p for p, _ in collect_images(inputs, recursive)]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--method", default="proxyclip",
                   help="proxyclip (default), naclip, sclip, clearclip, maskclip, clip, corrclip, corrclip_l14")
    g.add_argument("--clip", default=None, help="open_clip architecture (default ViT-B-16)")
    g.add_argument("--clip-weights", default=None,
                   help="open_clip pretrained tag (default openai), a local checkpoint file or folder, or 'random'")
    g.add_argument("--clip-tag", default=None,
                   help="the open_clip pretrained tag a local --clip-weights file holds (e.g. openai); it decides "
                        "the activation (QuickGELU or GELU)")
    g.add_argument("--vfm", default=None, help="VFM for proxyclip (default dino_b8); see 'ovseg list'")
    g.add_argument("--vfm-weights", default=None, action="append", metavar="[ROLE=]WEIGHTS",
                   help="local checkpoint in the official release format, or 'random'; for methods with several "
                        "VFMs, ROLE=FILE per role, the option repeated (e.g. trident: --vfm-weights vfm=dino.pth "
                        "--vfm-weights sam=sam_vit_b_01ec64.pth)")
    g.add_argument("--mask-generator", default=None,
                   help="corrclip: region mask generator (default sam2_hiera_l; 'none' = only --masks); "
                        "see 'ovseg list'")
    g.add_argument("--mask-weights", default=None,
                   help="corrclip: mask generator checkpoint in Meta's release format, or 'random'")
    g.add_argument("--random", action="store_true",
                   help="seeded random weights for CLIP and, if the method uses them, the VFM and the mask generator: "
                        "no download, meaningless labels (a smoke test of a setup)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    g.add_argument("--precision", default=None, choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto (default): fp16 on CUDA, bf16 on a CPU with native bf16 (AMX), else fp32")
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


def _validated(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call a function that only validates user-given values; its plain ValueError/TypeError is a user error."""
    try:
        return fn(*args, **kwargs)
    except OvsegError:
        raise
    except ValueError as e:
        raise InvalidInputError(str(e)) from e
    except TypeError as e:
        raise InvalidTypeError(str(e)) from e


def check_device(device: Optional[str]) -> None:
    """A device name that torch knows and that is usable here (checked before any model is built)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidInputError(f"--device {device!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise InvalidInputError(f"--device {device!r}: CUDA is not available here (see 'ovseg doctor'); use cpu")
        if dev.index is not None and dev.index >= n:
            raise InvalidInputError(f"--device {device!r}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
        return
    backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if not (callable(available) and available()):
        raise InvalidInputError(f"--device {device!r}: {dev.type} is not available here (see 'ovseg doctor'); "
                                "use cpu" + (" or cuda" if torch.cuda.is_available() else ""))


def check_out_dir(path: str, option: str = "--out") -> Path:
    """Create the output folder if needed and make sure files can be written in it (before models load)."""
    p = Path(os.path.expanduser(path))
    if p.exists() and not p.is_dir():
        raise InvalidInputError(f"{option} '{path}' is an existing file, not a folder")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InvalidInputError(f"{option} '{path}' cannot be created: '{parent}' is a file")
            break
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".ovseg-write-test-"):
            pass
    except OSError as e:
        raise InvalidInputError(f"{option} '{path}' is not writable ({e.strerror or e})") from None
    return p


def _check_range(value: Optional[float], option: str, lo: float, hi: Optional[float] = None) -> None:
    if value is None:
        return
    if value < lo or (hi is not None and value > hi):
        allowed = f"in [{lo:g}, {hi:g}]" if hi is not None else f">= {lo:g}"
        raise InvalidInputError(f"{option} must be {allowed}, got {value:g}")


def _templates(value: Optional[str]):
    if value is None or not os.path.isfile(os.path.expanduser(value)):
        return value
    from .text import read_text_lines

    lines = tuple(line for _, line in read_text_lines(value, option="--templates"))
    if not lines:
        raise InvalidInputError(f"--templates file '{value}' has no templates (only blank or # comment lines)")
    return lines


def check_model_args(args: argparse.Namespace) -> Dict[str, Any]:
    """Validate the model and inference options without building a model; returns the Segmenter arguments."""
    from .backbones import VFMS
    from .backbones.clip import _validate_arch
    from .methods import get_method
    from .text import get_templates

    _check_range(args.threshold, "--threshold", 0.0, 1.0)
    _check_range(args.batch_size, "--batch-size", 1)
    _check_range(args.pamr_steps, "--pamr-steps", 0)
    _check_range(args.short_side, "--short-side", 0)
    templates = _templates(args.templates)
    options = dict(window=args.window, stride=args.stride, short_side=args.short_side, threshold=args.threshold,
                   batch_size=args.batch_size, pamr_steps=args.pamr_steps, templates=templates)
    cfg = _validated(get_method, args.method)
    options.update(_mask_options(args, cfg))
    cfg = _validated(cfg.replace, clip=args.clip, vfm=args.vfm, **options)
    _validated(_validate_arch, cfg.clip)
    roles = cfg.vfm_names()
    for name in roles.values():
        VFMS.get(name)
    _validated(get_templates, cfg.templates)
    check_device(args.device)
    clip_weights, vfm_weights = args.clip_weights, vfm_weights_arg(args.vfm_weights, list(roles))
    if getattr(args, "random", False):
        if clip_weights not in (None, "random") or vfm_weights not in (None, "random"):
            raise InvalidInputError("--random replaces --clip-weights/--vfm-weights; give one or the other")
        clip_weights, vfm_weights = "random", ({role: "random" for role in roles} if roles else None)
    if vfm_weights is not None and not roles:
        raise InvalidInputError(f"--vfm-weights was given but method '{cfg.name}' uses no VFM; "
                                "drop it (--random sets random weights for whatever the method uses)")
    for value in (vfm_weights.values() if isinstance(vfm_weights, dict) else [vfm_weights]):
        if value not in (None, "random") and not Path(os.path.expanduser(value)).exists():
            raise PathNotFoundError(f"--vfm-weights: file not found: '{value}' (a VFM checkpoint in its official "
                                    "release format, or 'random')")
    if getattr(args, "random", False) and cfg.strategy_options.get("mask_generator", "none") != "none":
        if options.get("mask_weights") not in (None, "random"):
            raise InvalidInputError("--random replaces --mask-weights; give one or the other")
        options["mask_weights"] = "random"
    return dict(method=args.method, clip=args.clip, clip_weights=clip_weights, clip_tag=args.clip_tag, vfm=args.vfm,
                vfm_weights=vfm_weights, device=args.device, precision=args.precision, **options)


def vfm_weights_arg(values: Optional[Sequence[str]], roles: Sequence[str]) -> Union[None, str, Dict[str, str]]:
    """The repeated ``--vfm-weights [ROLE=]WEIGHTS`` -> the Segmenter's ``vfm_weights``: one plain value as it is
    (the ``"vfm"`` role; ``random`` means every role), else ``{role: weights}`` (a plain value is the ``"vfm"`` role).
    """
    if not values:
        return None
    if isinstance(values, str):
        values = [values]
    if len(values) == 1 and not re.match(r"^[A-Za-z_]\w*=", values[0]):
        return values[0]
    out: Dict[str, str] = {}
    for value in values:
        m = re.match(r"^([A-Za-z_]\w*)=(.+)$", value)
        role, weights = (m.group(1), m.group(2)) if m else ("vfm", value)
        if roles and role not in roles:
            raise InvalidInputError(f"--vfm-weights {value!r}: this method's VFM roles are {', '.join(roles)}")
        if role in out:
            raise InvalidInputError(f"--vfm-weights gives role '{role}' twice")
        out[role] = weights
    return out


def _mask_options(args: argparse.Namespace, cfg) -> Dict[str, Any]:
    """--mask-generator / --mask-weights (mask-guided methods only); with --masks DIR every image's masks come from
    DIR, so no generator is built unless one is named."""
    opts = {k: getattr(args, k, None) for k in ("mask_generator", "mask_weights")}
    if "mask_generator" not in cfg.option_names():
        given = [f"--{k.replace('_', '-')}" for k, v in opts.items() if v is not None]
        if given or getattr(args, "masks", None):
            raise InvalidInputError(f"{', '.join(given) or '--masks'} was given but method '{cfg.name}' uses no "
                                    "region masks (corrclip and corrclip_l14 do)")
        return {}
    if getattr(args, "masks", None) and opts["mask_generator"] is None:
        opts["mask_generator"] = "none"
    return {k: v for k, v in opts.items() if v is not None}


def _masks_folder(value: Optional[str]) -> Optional[Path]:
    if value is None:
        return None
    p = Path(os.path.expanduser(value))
    if not p.is_dir():
        raise PathNotFoundError(f"--masks: folder not found: '{value}'")
    return p


def _mask_files(masks_dir: Path, images: Sequence[Tuple[Path, str]]) -> List[Path]:
    """The mask file of every image: ``<output stem>.npz|.npy|.png|.tif`` (sub-folders mirrored as the outputs),
    else ``<file stem>.*`` directly in ``masks_dir`` (CorrCLIP's flat layout). A missing one is an error."""
    from .masks import find_mask_file

    found = []
    for path, stem in images:
        try:
            found.append(find_mask_file(masks_dir, stem))
        except PathNotFoundError:
            if stem == path.stem:
                raise
            found.append(find_mask_file(masks_dir, path.stem))
    return found


def _segmenter(args: argparse.Namespace, kwargs: Optional[Dict[str, Any]] = None):
    from .segmenter import Segmenter

    kw = dict(kwargs if kwargs is not None else check_model_args(args))
    kw["device"] = args.device  # torchrun may have picked the local GPU
    seg = Segmenter(kw.pop("method"), **kw)
    seg.text.progress = not getattr(args, "quiet", False)  # a bar when hundreds of prompts are encoded
    return seg


def _warn(message: str) -> None:
    print(f"ovseg: warning: {message}", file=sys.stderr)


def _labelset(args: argparse.Namespace):
    from .text import parse_labels, read_label_file

    if (args.labels is None) == (args.labels_file is None):
        raise InvalidInputError("give exactly one of --labels \"a, b; c\" or --labels-file FILE")
    raw = parse_label_text(args.labels) if args.labels is not None else read_label_file(args.labels_file,
                                                                                       option="--labels-file")
    try:
        return parse_labels(raw)
    except OvsegError as e:
        if args.labels_file is None:
            raise
        raise type(e)(f"--labels-file '{args.labels_file}': {e}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _outputs(out: Path, stem: str, save_probs: bool) -> Dict[str, Path]:
    """The files ``SegmentationResult.save`` writes for ``stem`` under ``out``."""
    paths = {"labels": out / f"{stem}_labels.png", "overlay": out / f"{stem}_overlay.png"}
    if save_probs:
        paths["probs"] = out / f"{stem}_probs.npy"
    return paths


def _record(path: Path, out: Path, paths: Dict[str, Path], label_map, labels: Sequence[str]) -> Dict[str, Any]:
    """One image's entry of results.json, from its label map (so a resumed image gets the same entry)."""
    import numpy as np

    counts = np.bincount(label_map.ravel(), minlength=len(labels))
    return {
        "file": str(path), "height": int(label_map.shape[0]), "width": int(label_map.shape[1]),
        **{f"{k}_{'npy' if k == 'probs' else 'png'}": os.path.relpath(v, out) for k, v in paths.items()},
        "fractions": {lab: round(float(c) / label_map.size, 6) for lab, c in zip(labels, counts)},
    }


def _stored_label_map(paths: Dict[str, Path]):
    """The label map of outputs written by an earlier run, or None if any of its files is missing."""
    import numpy as np
    from PIL import Image

    if not all(p.is_file() for p in paths.values()):
        return None
    try:
        with Image.open(paths["labels"]) as im:
            return np.asarray(im).astype(np.int64)
    except Exception:  # unreadable: predict again
        return None


def _run_settings(out: Path, keyed: Dict[str, Any], key: str, resume: bool, rank: int) -> bool:
    """Check (``resume``) and write ``out/settings.json``; True if outputs in ``out`` may be reused."""
    from .provenance import settings_diff

    path = out / "settings.json"
    reuse = False
    if resume:
        if path.is_file():
            old = json.loads(path.read_text(encoding="utf-8"))
            if old.get("key") != key:
                diff = "; ".join(settings_diff(old.get("keyed", {}), keyed))
                raise InvalidInputError(
                    f"--resume: the outputs in '{out}' were made with other settings ({diff}); run without "
                    "--resume (or with another --out) to predict them again with these settings")
            reuse = True
        elif rank == 0:
            _warn(f"--resume: '{out}' has no settings.json from an earlier run; predicting every image")
    if rank == 0:
        tmp = out / f".settings.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"key": key, "keyed": keyed}, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
    return reuse


def _cmd_predict(args: argparse.Namespace) -> int:
    from .distributed import finish_distributed, init_distributed

    labelset = _labelset(args)  # every argument is checked before any model is built
    images = collect_images(args.images, recursive=args.recursive)
    _check_range(args.alpha, "--alpha", 0.0, 1.0)
    _check_range(args.max_pixels, "--max-pixels", 1)
    seg_kwargs = check_model_args(args)
    masks_dir = _masks_folder(args.masks)
    mask_files = _mask_files(masks_dir, images) if masks_dir is not None else None  # all exist before models load
    out = check_out_dir(args.out)
    rank, world, args.device = init_distributed(args.device)
    try:
        return _predict(args, labelset, images, seg_kwargs, out, rank, world, mask_files)
    finally:
        finish_distributed(world)


def _predict(args, labelset, images, seg_kwargs, out: Path, rank: int, world: int,
             mask_files: Optional[List[Path]] = None) -> int:
    """Segment this process's share of ``images`` (every ``world``-th, from ``rank``); rank 0 writes results.json."""
    from .distributed import gather_objects, shard
    from .preprocess import load_image
    from .provenance import prediction_key, settings_of

    if rank == 0 and not args.resume and (out / "results.json").exists():
        _warn(f"'{args.out}' holds the results of an earlier run; its results.json and outputs with the same "
              "names are overwritten")
    seg = _segmenter(args, seg_kwargs)
    settings = settings_of(seg, vfm_weights=seg_kwargs["vfm_weights"])
    given = {"masks": str(_masks_folder(args.masks))} if mask_files is not None else {}  # masks change outputs
    key, keyed = prediction_key(settings, labels=list(labelset.names), queries=list(labelset.queries),
                                alpha=args.alpha, **given)
    reuse = _run_settings(out, keyed, key, args.resume, rank)
    mine = shard(len(images), rank, world)
    records: Dict[int, Dict[str, Any]] = {}
    failures: Dict[int, Dict[str, str]] = {}
    reused = 0
    complete = False
    iterator = mine
    if not args.quiet and rank == 0:
        from tqdm.auto import tqdm

        iterator = tqdm(mine, desc="images" if world == 1 else f"images (rank 0 of {world})", unit="img",
                        file=sys.stderr)
    try:
        for i in iterator:
            path, stem = images[i]
            paths = _outputs(out, stem, args.save_probs)
            stored = _stored_label_map(paths) if reuse else None
            if stored is not None:
                records[i] = _record(path, out, paths, stored, labelset.names)
                reused += 1
                continue
            try:  # a bad file (unreadable, too large, too small) is skipped; everything else is a bug and stops
                rgb = load_image(path, max_pixels=args.max_pixels)
                masks = None
                if mask_files is not None:
                    from .masks import load_region_map

                    masks = load_region_map(mask_files[i])
                res = seg.predict(rgb, labelset, return_probs=args.save_probs, masks=masks)
            except OvsegError as e:
                _warn(f"skipped '{path}': {_one_line(e)}")
                failures[i] = {"file": str(path), "error": _one_line(e)}
                continue
            res.save(out / Path(stem).parent, Path(stem).name, save_probs=args.save_probs, alpha=args.alpha)
            records[i] = _record(path, out, paths, res.label_map, labelset.names)
        complete = True
    finally:
        # one results.json, merged in input order; a single process writes it even when a bug or Ctrl-C stops
        # it ("complete": false). Under torchrun a failing rank stops them all: --resume continues from the files.
        if complete or world == 1:
            parts = gather_objects((records, failures, reused), world) if complete else [(records, failures, reused)]
            all_records = {i: r for part in parts for i, r in part[0].items()}
            all_failures = {i: f for part in parts for i, f in part[1].items()}
            if rank == 0:
                summary = {
                    "ovseg": __version__, "method": seg.cfg.name, "clip": seg.cfg.clip,
                    "clip_weights": seg.clip.weights, "clip_activation": seg.clip.activation,
                    "clip_identity": seg.clip.identity, "vfm": seg.cfg.vfm, "settings": settings, "key": key,
                    "max_pixels": args.max_pixels, "labels": list(labelset.names), "queries": list(labelset.queries),
                    "query_class": [labelset.names[c] for c in labelset.query_class],
                    "synonyms": labelset.synonyms(), "complete": complete, "world_size": world,
                    "num_images": len(all_records), "num_reused": sum(p[2] for p in parts),
                    "num_failed": len(all_failures),
                    "images": [all_records[i] for i in sorted(all_records)],
                    "failed": [all_failures[i] for i in sorted(all_failures)],
                }
                tmp = out / f".results.json.{os.getpid()}.tmp"
                tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
                os.replace(tmp, out / "results.json")
    n_failed = len(all_failures)
    if n_failed:
        if rank == 0:
            print(f"ovseg: {n_failed} of {len(images)} input(s) failed (listed under \"failed\" in "
                  f"{out}/results.json); exit code {EXIT_PARTIAL}", file=sys.stderr)
        return EXIT_PARTIAL
    if not args.quiet and rank == 0:
        extra = f", {sum(p[2] for p in parts)} reused" if args.resume else ""
        print(f"wrote {len(all_records)} result(s) to {out}/ (results.json{extra})", file=sys.stderr)
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
    section("vfms (proxyclip's --vfm; the VFM roles of other methods)", describe_vfms().items())
    from .masks import describe_mask_generators

    section("mask generators (for corrclip)", describe_mask_generators().items())
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
    from .cache import TextEmbeddingCache
    from .precision import cpu_capability_line, resolve_precision

    print(cpu_capability_line())
    device = "cuda" if cuda else "cpu"
    print(f"default device: {device} | precision \"auto\" picks: {resolve_precision('auto', device)}")
    print(f"text-embedding cache: {_cache_summary(TextEmbeddingCache().info())}")
    print("packages:")
    for pkg, extra in (("open_clip_torch", ""), ("timm", ""), ("torchvision", ""), ("huggingface_hub", ""),
                       ("safetensors", ""), ("numpy", ""), ("pillow", ""), ("diffusers", "sd"),
                       ("transformers", "sd"), ("sam2", "sam2"), ("segment-anything", "sam")):
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


def _cache_summary(info: dict) -> str:
    state = "" if info["enabled"] else " (disabled: OVSEG_TEXT_CACHE=0 or a 0 MB bound)"
    return (f"{info['location']} | {info['entries']} entries, {info['bytes'] / 2**20:.1f} MB of "
            f"{info['max_bytes'] / 2**20:.0f} MB{state}")


def _cmd_cache(args: argparse.Namespace) -> int:
    from .cache import ENV_HOME, ENV_TEXT_CACHE, ENV_TEXT_CACHE_MB, TextEmbeddingCache

    cache = TextEmbeddingCache()
    if args.action == "clear":
        n, size = cache.clear()
        print(f"removed {n} text-embedding entries ({size / 2**20:.1f} MB) from {cache.dir}")
        return 0
    info = cache.info()
    print(f"text-embedding cache: {info['location']}")
    print(f"entries: {info['entries']} | size: {info['bytes'] / 2**20:.1f} MB | bound: "
          f"{info['max_bytes'] / 2**20:.0f} MB ({ENV_TEXT_CACHE_MB}) | enabled: {'yes' if info['enabled'] else 'no'} "
          f"({ENV_TEXT_CACHE}=0 disables)")
    print(f"location set by {ENV_HOME} (default ~/.cache/ovseg)")
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
    from .eval.datasets import SegmentationFolder, get_dataset_spec
    from .eval.presets import get_eval_preset
    from .eval.published import PAPER_DATASETS
    from .eval.runner import init_distributed, read_roots, run_eval, run_suite

    if args.suite is None and (args.dataset is None or args.root is None):
        raise InvalidInputError("give --dataset NAME --root PATH, or --suite paper --roots roots.toml")
    if args.suite is not None and args.roots is None:
        raise InvalidInputError("--suite paper needs --roots roots.toml (dataset = \"/path/to/root\" per line)")
    if args.limit is not None and args.limit <= 0:
        raise InvalidInputError(f"--limit must be a positive number of images, got {args.limit}")
    roots = read_roots(args.roots) if args.suite else {args.dataset: args.root}
    names = PAPER_DATASETS if args.suite else [args.dataset]
    missing = [d for d in names if d not in roots]
    if missing:
        raise InvalidInputError(f"--roots '{args.roots}' has no entry for: {', '.join(missing)}")
    seg_kwargs = check_model_args(args)
    masks_dir = _masks_folder(args.masks)
    for name in names:  # every dataset name, root, layout and preset is checked before any model is built
        get_dataset_spec(name)  # did-you-mean for a misspelt name
        get_eval_preset(args.method, name)
        SegmentationFolder(name, roots[name])
    if args.out:
        check_out_dir(args.out)
    rank, world, args.device = init_distributed(args.device)
    seg = _segmenter(args, seg_kwargs)  # dataset presets, then these overrides, are applied per dataset
    overrides = {"window": args.window, "stride": args.stride, "short_side": args.short_side,
                 "threshold": args.threshold}
    common = dict(out_dir=args.out, resume=args.resume, limit=args.limit, strict_ignore=args.strict_ignore,
                  overrides=overrides, progress=not args.quiet, rank=rank, world=world,
                  vfm_weights=seg_kwargs["vfm_weights"], masks=str(masks_dir) if masks_dir is not None else None)
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


class _Parser(argparse.ArgumentParser):
    """argparse errors become one-line user errors (exit 2) instead of a usage dump."""

    def error(self, message: str):  # type: ignore[override]
        raise InvalidInputError(f"{message} (see '{self.prog} --help')")


PREDICT_EPILOG = f"""exit codes: 0 all images segmented; {EXIT_USER_ERROR} bad arguments or input (one line on stderr,
before any model is loaded); {EXIT_PARTIAL} finished, but some inputs could not be read (skipped with a warning,
listed under "failed" in results.json); 130 interrupted."""


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="segment images with a list of words",
                       description="Segment images (files, folders or globs) with any labels. Outputs mirror "
                                   "the input folders under --out.",
                       epilog=PREDICT_EPILOG)
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--labels", default=None, help='comma-separated, ";" between synonyms: "cat, sofa; couch, floor"')
    p.add_argument("--labels-file", default=None,
                   help="UTF-8 text, one label per line (';' between synonyms, '#' comments)")
    p.add_argument("--out", default="out", help="output folder (default: out/)")
    p.add_argument("--save-probs", action="store_true", help="also write <stem>_probs.npy (C, H, W) float32")
    p.add_argument("--alpha", type=float, default=0.5, help="mask opacity in the overlay, in [0, 1] (default 0.5)")
    p.add_argument("--recursive", action="store_true", help="search folders recursively")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="read images up to this many pixels (default: Pillow's decompression-bomb limit, ~179 MP)")
    p.add_argument("--resume", action="store_true",
                   help="skip images whose outputs are already in --out, made with the same settings (refused if "
                        "they were made with others)")
    p.add_argument("--masks", default=None,
                   help="corrclip: folder of region masks, <image stem>.npz (array 'instance_mask'), .npy or .png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_args(p)
    p.set_defaults(func=_cmd_predict)


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="mIoU on a benchmark (or the papers' suite), single process or torchrun",
                       description="Evaluate a method with the reference settings of each dataset. Under torchrun "
                                   "the dataset is sharded over processes.")
    e.add_argument("--dataset", default=None, help="voc21, voc20, context60, context59, coco_object, coco_stuff, "
                                                   "cityscapes, ade20k, ade847, pc459")
    e.add_argument("--root", default=None, help="the dataset folder, prepared as MMSegmentation does")
    e.add_argument("--suite", default=None, choices=["paper"], help="the eight datasets of the papers' tables")
    e.add_argument("--roots", default=None, help="roots.toml: one 'dataset = \"path\"' line per dataset")
    e.add_argument("--out", default=None, help="folder for <dataset>_<method>.json/.md and predicted PNGs")
    e.add_argument("--resume", action="store_true",
                   help="reuse predictions under --out made with the same settings and weights (refused if they "
                        "were made with others)")
    e.add_argument("--limit", type=int, default=None, help="only the first N images (smoke tests)")
    e.add_argument("--strict-ignore", action="store_true",
                   help="also ignore labels outside [0, C) (the references count them; see docs/evaluation.md)")
    e.add_argument("--masks", default=None,
                   help="corrclip: folder of region masks per image (<stem>.npz ...), per dataset in <dataset>/ or "
                        "CorrCLIP's region_masks layout (voc, context, city, ade, coco)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_args(e)
    e.set_defaults(func=_cmd_eval)


def _add_convert_coco_object(sub) -> None:
    c = sub.add_parser("convert-coco-object", help="make COCO-Object labels from COCO-Stuff-164k")
    c.add_argument("root", help="the coco_stuff164k folder (annotations/<split>/*.png)")
    c.add_argument("--splits", nargs="+", default=["val2017"])
    c.add_argument("--out", default=None, help="output root (default: the same folder)")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_cmd_convert_coco_object)


def _add_list(sub) -> None:
    s = sub.add_parser("list", help="methods, VFMs, attentions, CLIP architectures and pretrained tags")
    s.set_defaults(func=_cmd_list)


def _add_doctor(sub) -> None:
    d = sub.add_parser("doctor", help="environment, devices, package versions and cached weights")
    d.set_defaults(func=_cmd_doctor)


def _add_cache(sub) -> None:
    k = sub.add_parser("cache", help="the persistent text-embedding cache: info or clear",
                       description="Text embeddings are kept under $OVSEG_HOME/text (default ~/.cache/ovseg).")
    k.add_argument("action", nargs="?", default="info", choices=["info", "clear"])
    k.set_defaults(func=_cmd_cache)


def _demo_vfm_weights(values: Optional[Sequence[str]]) -> Optional[str]:
    weights = vfm_weights_arg(values, [])
    if isinstance(weights, dict):
        raise InvalidInputError("ovseg demo takes one --vfm-weights (a file of the --vfm VFM, or 'random'); "
                                "per-role files are for ovseg predict / eval")
    return weights


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import launch_demo

    def factory(method: str, vfm: Optional[str], vfm_weights: Optional[str]):  # the UI's choice + these options
        return _segmenter(argparse.Namespace(**{**vars(args), "method": method, "vfm": vfm,
                                                "vfm_weights": vfm_weights}))

    return launch_demo(host=args.host, port=args.port, share=args.share, method=args.method, vfm=args.vfm,
                       clip=args.clip, clip_weights=args.clip_weights, vfm_weights=_demo_vfm_weights(args.vfm_weights),
                       threshold=args.threshold, factory=factory)


def _add_demo(sub) -> None:
    w = sub.add_parser("demo", help='a web demo in the browser (pip install "ovseg[demo]")',
                       description="Serve a Gradio web demo: upload an image, type labels, pick the method and VFM. "
                                   "The options below set the weights and the initial choice; see docs/demo.md.")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    w.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    w.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default)")
    _add_model_args(w)
    w.set_defaults(func=_cmd_demo)


# One function per subcommand, in the order of ``ovseg --help``; a new subcommand adds its own line.
SUBCOMMANDS = [_add_predict, _add_list, _add_doctor, _add_eval, _add_cache, _add_convert_coco_object, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ovseg", description="Training-free open-vocabulary semantic segmentation.")
    parser.add_argument("--version", action="version", version=f"ovseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        print("ovseg: interrupted", file=sys.stderr)
        return 130
    except OvsegError as e:  # a user error: one line; anything else is a bug and keeps its traceback
        print(f"ovseg: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        # a Segmenter holds a reference cycle (a bound method of itself), so its models are freed by the cyclic
        # collector only: collect now, so that calling main() repeatedly in one process does not pile them up
        gc.collect()
