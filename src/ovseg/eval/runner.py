"""Benchmark evaluation: one dataset or the papers' suite, on one device or sharded under ``torchrun``.

Each process takes images ``rank, rank + W, rank + 2W, ...`` (no overlap, no loss), writes its predicted label
maps as PNG (reused by ``resume``), accumulates an int64 confusion matrix on its device; the matrices are summed
with ``all_reduce`` (gloo on CPU, nccl on GPU) and only rank 0 writes the JSON and Markdown reports.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from ..distributed import dist_info, init_distributed  # noqa: F401  (re-exported: ovseg <= 0.1 imported them here)
from ..errors import InvalidInputError, PathNotFoundError
from ..provenance import prediction_key, settings_diff, settings_of
from .datasets import SegmentationFolder
from .metrics import ConfusionMatrix
from .presets import get_eval_preset, read_class_file
from .published import PAPER_DATASETS, published_for

logger = logging.getLogger(__name__)

__all__ = ["dist_info", "evaluate_dataset", "run_eval", "run_suite", "init_distributed", "share_text_embeddings"]


def _save_png(path: Path, label_map: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = label_map.astype(np.uint8 if label_map.max(initial=0) < 256 else np.uint16)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written prediction


def _load_png(path: Path) -> Optional[np.ndarray]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.array(im).astype(np.int64)
    except Exception:
        return None


def share_text_embeddings(seg, queries, *, rank: int = 0, world: int = 1, progress: bool = False) -> torch.Tensor:
    """Encode a dataset's queries once for the whole run and return them, (Q, E) on ``seg.device``.

    Rank 0 encodes (its persistent text cache helps across runs) and broadcasts the tensor; the other ranks put it
    into their classifier (``TextClassifier.prime``) and encode nothing. Every later ``predict`` finds the
    embeddings in memory.
    """
    queries = list(queries)
    if world <= 1:
        return seg.text(queries, seg.templates, device=seg.device, progress=progress)
    import torch.distributed as dist

    if rank == 0:
        emb = seg.text(queries, seg.templates, device=seg.device, progress=progress).contiguous()
        shape = torch.tensor(emb.shape, dtype=torch.long, device=seg.device)
    else:
        shape = torch.zeros(2, dtype=torch.long, device=seg.device)
    dist.broadcast(shape, src=0)
    if rank != 0:
        emb = torch.empty(tuple(int(v) for v in shape.tolist()), dtype=torch.float32, device=seg.device)
    dist.broadcast(emb, src=0)
    if rank != 0:
        seg.text.prime(queries, seg.templates, emb)
    return emb


def evaluate_dataset(seg, dataset: SegmentationFolder, labels, *, pred_dir: Optional[Path] = None,
                     resume: bool = False, rank: int = 0, world: int = 1, limit: Optional[int] = None,
                     strict_ignore: bool = False, progress: bool = False,
                     masks_dir: Optional[Path] = None) -> Tuple[ConfusionMatrix, int]:
    """This process's share of the dataset -> (local confusion matrix, number of images evaluated).

    ``masks_dir``: region masks per image (``<image stem>.npz|.npy|.png``) for mask-guided methods."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    indices = list(range(rank, n, world))
    cm = ConfusionMatrix(dataset.spec.num_classes, strict_ignore=strict_ignore, device=seg.device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices), desc=f"{dataset.spec.name} (rank {rank}/{world})" if world > 1
                   else dataset.spec.name, unit="img", file=sys.stderr)
    reused = 0
    for k, idx in enumerate(indices):
        sample_id, img_path, _ = dataset.samples[idx]
        pred = None
        pred_path = pred_dir / f"{sample_id}.png" if pred_dir is not None else None
        if resume and pred_path is not None and pred_path.is_file():
            pred = _load_png(pred_path)
            reused += pred is not None
        if pred is None:
            masks = None
            if masks_dir is not None:
                from ..masks import find_mask_file, load_region_map

                masks = load_region_map(find_mask_file(masks_dir, Path(img_path).stem))
            pred = seg.predict_label_map(str(img_path), labels, masks=masks)  # stays on the device
            if pred_path is not None:
                _save_png(pred_path, pred.cpu().numpy())
        else:
            pred = torch.from_numpy(pred)
        gt = dataset.load_label(idx)
        if tuple(pred.shape) != tuple(gt.shape):
            raise InvalidInputError(f"{sample_id}: prediction {tuple(pred.shape)} and ground truth {gt.shape} "
                                    "differ in size")
        cm.update(pred, torch.from_numpy(gt))
        if bar is not None:
            bar.update(1)
            if k % 5 == 0 or k == len(indices) - 1:
                bar.set_postfix(mIoU=f"{cm.compute()['mIoU'] or 0:.2f}")
    if bar is not None:
        bar.close()
    if reused:
        logger.info("reused %d predictions from %s", reused, pred_dir)
    return cm, len(indices)


def _dataset_options(method: str, dataset: str, overrides: Dict[str, Any]) -> Tuple[Dict[str, Any], Any]:
    from ..methods import get_method
    from .presets import HARNESS

    preset = get_eval_preset(method, dataset)
    # strategy options that some dataset of this method sets go back to the method's preset values elsewhere
    keys = {k for p in HARNESS.get(method, {}).values() for k in p.options}
    defaults = get_method(method).strategy_options
    opts = {k: defaults[k] for k in keys if k in defaults}
    opts.update({"short_side": preset.short_side, "window": preset.window or 0, "stride": preset.stride,
                 "threshold": preset.threshold, "logit_scale": preset.logit_scale,
                 "area_threshold": preset.area_threshold, **preset.options})
    opts.update({k: v for k, v in overrides.items() if v is not None})
    return opts, preset


def _published(seg, masks: Optional[str]) -> Optional[Dict[str, Any]]:
    settings = dict(seg.cfg.strategy_options)
    if getattr(seg.model.strategy, "uses_masks", False):
        settings["masks"] = "given" if masks else "generated"
    return published_for(seg.cfg.name, seg.cfg.clip, seg.cfg.vfm, seg.cfg.pamr_steps > 0, settings)


def _write_json_atomic(path: Path, data: Dict[str, Any], rank: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{rank}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def prediction_dir(root: Path, key: str, keyed: Dict[str, Any], *, resume: bool, rank: int = 0) -> Path:
    """``root/<key>``: the stored predictions of exactly these settings, with their ``settings.json``.

    With ``resume``, predictions stored under ``root`` with other settings are not mixed in: if some exist
    and none match, this raises an error naming what differs.
    """
    pred_dir = root / key
    if resume and not (pred_dir / "settings.json").is_file():
        others = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(root.glob("*/settings.json"))]
        if others:
            nearest = min(others, key=lambda old: len(list(settings_diff(old, keyed, limit=10**6))))
            diff = "; ".join(settings_diff(nearest, keyed))
            raise InvalidInputError(
                f"--resume: the predictions in '{root}' were made with other settings ({diff}); run without "
                f"--resume to predict again with these settings (kept apart in '{pred_dir}'), or use the earlier "
                "settings"
            )
        logger.info("--resume: no stored predictions in %s yet", root)
    _write_json_atomic(pred_dir / "settings.json", keyed, rank)
    return pred_dir


def run_eval(seg, dataset_name: str, root: str, *, out_dir: Optional[str] = None, resume: bool = False,
             limit: Optional[int] = None, strict_ignore: bool = False, overrides: Optional[Dict[str, Any]] = None,
             progress: bool = True, rank: int = 0, world: int = 1,
             vfm_weights: Optional[str] = None, masks: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Evaluate ``seg`` on one dataset with the method's reference settings (``overrides`` on top).

    ``masks``: a folder of region masks for mask-guided methods (CorrCLIP): ``<image stem>.npz`` etc. in
    ``masks/<dataset>``, CorrCLIP's published layout ``masks/<voc|context|city|ade|coco>``, or ``masks`` itself.
    Returns the result dict on rank 0 (None elsewhere) and writes ``<out>/<dataset>_<method>.json/.md``.
    Predicted label maps go to ``<out>/preds/<dataset>_<method>/<key>/``, where ``key`` hashes everything that
    changes them (:func:`ovseg.provenance.prediction_key`: method options, weights, precision, ovseg version,
    dataset and class names); ``resume`` reuses only predictions with the same key. ``vfm_weights`` is what
    the Segmenter was given (recorded in the settings).
    """
    masks_dir = None
    if masks is not None:
        from ..masks import mask_folder_for

        masks_dir = mask_folder_for(masks, dataset_name)
    opts, preset = _dataset_options(seg.cfg.name, dataset_name, overrides or {})
    seg.configure(**opts)
    labels = read_class_file(preset.class_file, preset.separator)
    dataset = SegmentationFolder(dataset_name, root)
    if len(labels.names) != dataset.spec.num_classes:  # pragma: no cover - guarded by the shipped files
        raise RuntimeError(f"class file {preset.class_file} has {len(labels.names)} classes, "
                           f"{dataset_name} has {dataset.spec.num_classes}")
    tag = f"{dataset_name}_{seg.cfg.name}"
    out = Path(out_dir) if out_dir else None
    settings = settings_of(seg, vfm_weights=vfm_weights)
    given = {"masks": str(masks_dir)} if masks_dir is not None else {}  # given region masks change predictions
    key, keyed = prediction_key(settings, dataset=dataset_name, class_file=preset.class_file,
                                labels=list(labels.names), queries=list(labels.queries), **given)
    pred_dir = prediction_dir(out / "preds" / tag, key, keyed, resume=resume, rank=rank) if out else None
    t0 = time.perf_counter()
    share_text_embeddings(seg, labels.queries, rank=rank, world=world, progress=progress and rank == 0)
    cm, n_local = evaluate_dataset(seg, dataset, labels, pred_dir=pred_dir, resume=resume, rank=rank, world=world,
                                   limit=limit, strict_ignore=strict_ignore, progress=progress and rank == 0,
                                   masks_dir=masks_dir)
    cm.all_reduce()
    n_total = n_local
    if world > 1:
        import torch.distributed as dist

        t = torch.tensor([n_local], device=cm.mat.device)
        dist.all_reduce(t)
        n_total = int(t.item())
    if rank != 0:
        return None
    metrics = cm.compute(labels.names)
    pub = _published(seg, masks)
    result = {
        "dataset": dataset_name, "root": str(root), "method": seg.cfg.name, "clip": seg.cfg.clip,
        "clip_weights": seg.clip.weights, "vfm": seg.cfg.vfm, "settings": settings,
        "predictions": None if pred_dir is None else str(pred_dir), "prediction_key": key,
        "class_file": preset.class_file, "preset_note": preset.note, "num_images": n_total, "world_size": world,
        "seconds": round(time.perf_counter() - t0, 2), "strict_ignore": strict_ignore,
        **({"masks": str(masks_dir)} if masks_dir is not None else {}), "metrics": metrics,
        "confusion_matrix": cm.mat.cpu().numpy().tolist(),
    }
    if pub and dataset_name in pub["miou"]:
        theirs = pub["miou"][dataset_name]
        result["published"] = {"mIoU": theirs, "source": pub["source"], "clip_weights": pub["clip_weights"],
                               "diff": None if metrics["mIoU"] is None else round(metrics["mIoU"] - theirs, 2)}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{tag}.json").write_text(json.dumps(result, indent=2))
        (out / f"{tag}.md").write_text(markdown_report(result))
    return result


_REPORTED = ("short_side", "window", "stride", "pad_multiple", "threshold", "logit_scale", "pamr_steps", "templates",
             "attention")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown_report(r: Dict[str, Any]) -> str:
    m = r["metrics"]
    lines = [f"# {r['method']} on {r['dataset']}", "",
             f"CLIP `{r['clip']}` ({r['clip_weights']})" + (f", VFM `{r['vfm']}`" if r["vfm"] else "")
             + f"; {r['num_images']} images; {r['seconds']} s on {r['world_size']} process(es).", "",
             "| mIoU | mAcc | aAcc | published mIoU | diff |", "|---|---|---|---|---|"]
    pub = r.get("published")
    lines.append(f"| {_fmt(m['mIoU'])} | {_fmt(m['mAcc'])} | {_fmt(m['aAcc'])} | "
                 f"{_fmt(pub['mIoU']) if pub else '-'} | {_fmt(pub['diff']) if pub else '-'} |")
    if pub:
        lines += ["", f"Published: {pub['source']} (CLIP weights `{pub['clip_weights']}`)."]
    s = {k: v for k, v in r["settings"]["options"].items() if k in _REPORTED}
    s["precision"] = r["settings"]["precision"]
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in s.items()) + f"; classes from `{r['class_file']}`"
              + (f" ({r['preset_note']})" if r.get("preset_note") else ""), "",
              "| class | IoU | Acc |", "|---|---|---|"]
    for name, v in m["per_class"].items():
        lines.append(f"| {name} | {_fmt(v['IoU'])} | {_fmt(v['Acc'])} |")
    return "\n".join(lines) + "\n"


def read_roots(path: str) -> Dict[str, str]:
    """``roots.toml``: ``voc21 = "/data/VOCdevkit/VOC2012"`` per dataset (top level or under ``[roots]``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PathNotFoundError(f"--roots: file not found: '{path}'")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib  # type: ignore
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8-sig"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"--roots '{path}' is not valid UTF-8 TOML: {e}") from None
    data = data.get("roots", data)
    return {str(k): str(v) for k, v in data.items()}


def run_suite(seg, roots: Dict[str, str], *, datasets=PAPER_DATASETS, out_dir: Optional[str] = None,
              **kwargs) -> Optional[Dict[str, Any]]:
    """The papers' eight benchmarks (those with a root) and a table beside the published numbers."""
    missing = [d for d in datasets if d not in roots]
    if missing:
        raise InvalidInputError(f"roots file has no entry for: {', '.join(missing)} (keys: {', '.join(datasets)})")
    results = {}
    for name in datasets:
        r = run_eval(seg, name, roots[name], out_dir=out_dir, **kwargs)
        if r is not None:
            results[name] = r
    if not results:
        return None
    pub = _published(seg, kwargs.get("masks"))
    rows = []
    for name in datasets:
        ours = results[name]["metrics"]["mIoU"]
        theirs = pub["miou"].get(name) if pub else None
        rows.append((name, ours, theirs, None if ours is None or theirs is None else ours - theirs))
    ours_avg = float(np.mean([r[1] for r in rows])) if all(r[1] is not None for r in rows) else None
    theirs_avg = float(np.mean([r[2] for r in rows])) if all(r[2] is not None for r in rows) else None
    rows.append(("average", ours_avg, theirs_avg,
                 None if ours_avg is None or theirs_avg is None else ours_avg - theirs_avg))
    suite = {"method": seg.cfg.name, "clip": seg.cfg.clip, "clip_weights": seg.clip.weights, "vfm": seg.cfg.vfm,
             "published_source": pub["source"] if pub else None,
             "table": [{"dataset": n, "mIoU": o, "published": t, "diff": d} for n, o, t, d in rows]}
    md = [f"# {seg.cfg.name} — paper suite", "",
          f"CLIP `{seg.cfg.clip}` ({seg.clip.weights})" + (f", VFM `{seg.cfg.vfm}`" if seg.cfg.vfm else "")
          + (f"; published: {pub['source']} (CLIP weights `{pub['clip_weights']}`)" if pub else
             "; no published row for this configuration"), "",
          "| dataset | mIoU | published | diff |", "|---|---|---|---|"]
    md += [f"| {n} | {_fmt(o)} | {_fmt(t)} | {'-' if d is None else f'{d:+.2f}'} |" for n, o, t, d in rows]
    suite["markdown"] = "\n".join(md) + "\n"
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / f"suite_{seg.cfg.name}.json").write_text(json.dumps(suite, indent=2))
        (Path(out_dir) / f"suite_{seg.cfg.name}.md").write_text(suite["markdown"])
    return suite
