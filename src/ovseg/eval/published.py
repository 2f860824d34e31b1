"""Published mIoU (%) to compare against: ProxyCLIP (ECCV'24) Tables 1-3 and NACLIP (WACV'25) Tables 1-2, from
the papers' tables, and CorrCLIP (ICCV'25) from its official README (docs/evaluation.md). Keys: (method, CLIP
architecture, VFM or None, PAMR on); a key may hold several rows that differ in further settings."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["PUBLISHED", "published_for", "PAPER_DATASETS"]

PAPER_DATASETS = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade20k")
_PX = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade20k")
_NA = ("voc21", "context60", "coco_object", "voc20", "cityscapes", "context59", "ade20k", "coco_stuff")


def _row(order, values, source):
    return {"source": source, "miou": dict(zip(order, values))}


T1 = "ProxyCLIP Table 1"
T2 = "ProxyCLIP Table 2"
T3 = "ProxyCLIP Table 3"
N1 = "NACLIP Table 1"
PUBLISHED: Dict[Tuple[str, str, Optional[str], bool], Any] = {
    ("proxyclip", "ViT-B-16", "dino_b8", False): _row(_PX, (61.3, 35.3, 37.5, 80.3, 39.1, 26.5, 38.1, 20.2), T1),
    ("proxyclip", "ViT-L-14", "dino_b8", False): _row(_PX, (60.6, 34.5, 39.2, 83.2, 37.7, 25.6, 40.1, 22.6), T1),
    ("proxyclip", "ViT-H-14", "dino_b8", False): _row(_PX, (65.0, 35.4, 38.6, 83.3, 39.6, 26.8, 42.0, 24.2), T1),
    ("proxyclip", "ViT-B-16", "mae_b16", False): _row(_PX, (52.2, 30.4, 30.8, 76.3, 33.5, 23.1, 30.1, 17.1), T2),
    ("proxyclip", "ViT-B-16", "sam_b16", False): _row(_PX, (59.3, 33.6, 35.4, 80.4, 37.0, 25.0, 37.0, 19.1), T2),
    ("proxyclip", "ViT-B-16", "sd15", False): _row(_PX, (60.3, 34.7, 36.5, 82.0, 38.2, 25.9, 37.7, 19.6),
                                                   T2 + " (SD version not stated)"),
    ("proxyclip", "ViT-B-16", "dinov2_b14_reg", False): _row(_PX, (58.6, 33.8, 37.4, 83.0, 37.2, 25.4, 33.9, 19.7),
                                                             T2),
    ("proxyclip", "ViT-B-16", "dino_b16", False): _row(_PX, (59.3, 34.4, 36.2, 79.7, 38.1, 25.7, 36.0, 19.4), T2),
    ("proxyclip", "ViT-B-16", "dino_s16", False): _row(_PX, (59.1, 34.2, 35.8, 79.8, 37.9, 25.6, 35.8, 19.2), T3),
    ("proxyclip", "ViT-B-16", "dino_s8", False): _row(_PX, (60.0, 34.7, 36.9, 79.6, 38.5, 26.2, 37.7, 19.9), T3),
    ("proxyclip", "ViT-H-14", "mae_b16", False): _row(_PX, (54.7, 29.8, 32.2, 80.6, 32.9, 21.8, 34.9, 19.4), T2),
    ("proxyclip", "ViT-H-14", "sam_b16", False): _row(_PX, (63.5, 34.1, 36.7, 84.0, 37.9, 25.0, 41.1, 22.0), T2),
    ("proxyclip", "ViT-H-14", "sd15", False): _row(_PX, (62.8, 34.6, 34.7, 84.9, 38.5, 26.2, 41.5, 22.9),
                                                   T2 + " (SD version not stated)"),
    ("proxyclip", "ViT-H-14", "dinov2_b14_reg", False): _row(_PX, (61.5, 34.0, 37.3, 86.1, 37.8, 26.2, 37.8, 23.4),
                                                             T2),
    ("proxyclip", "ViT-H-14", "dino_b16", False): _row(_PX, (62.9, 34.7, 37.8, 83.7, 38.7, 26.4, 38.6, 23.5), T2),
    ("proxyclip", "ViT-H-14", "dino_s16", False): _row(_PX, (62.8, 34.5, 37.5, 83.8, 38.4, 26.1, 38.6, 23.1), T3),
    ("proxyclip", "ViT-H-14", "dino_s8", False): _row(_PX, (63.5, 34.8, 38.0, 82.2, 38.9, 26.3, 41.7, 23.9), T3),
    ("naclip", "ViT-B-16", None, True): _row(_NA, (64.1, 35.0, 36.2, 83.0, 38.3, 38.4, 19.1, 25.7), N1),
    ("naclip", "ViT-B-16", None, False): _row(_NA, (58.9, 32.2, 33.2, 79.7, 35.5, 35.2, 17.4, 23.3),
                                              N1 + " (w/o post-processing)"),
    ("naclip", "ViT-B-32", None, True): {"source": "NACLIP Table 2", "miou": {"voc21": 54.8, "context59": 34.9}},
    ("naclip", "ViT-L-14", None, True): {"source": "NACLIP Table 2", "miou": {"voc21": 57.9, "context59": 36.4}},
    ("sclip", "ViT-B-16", None, False): _row(_NA, (59.1, 30.4, 30.5, 80.4, 32.2, 34.2, 16.1, 22.4), N1),
    ("sclip", "ViT-B-16", None, True): _row(_NA, (61.7, 31.5, 32.1, 83.5, 34.1, 36.1, 17.8, 23.9),
                                            N1 + " (SCLIP with PAMR)"),
    ("sclip", "ViT-L-14", None, False): _row(_PX, (43.5, 22.3, 25.0, 69.1, 25.2, 17.6, 18.6, 10.9), T1),
    ("sclip", "ViT-H-14", None, False): _row(_PX, (43.8, 23.5, 24.6, 67.5, 25.6, 16.8, 19.5, 11.3), T1),
    ("maskclip", "ViT-B-16", None, False): _row(_NA, (43.4, 23.2, 20.6, 74.9, 24.9, 26.4, 11.9, 16.7), N1),
    ("maskclip", "ViT-L-14", None, False): _row(_PX, (23.3, 11.7, 7.2, 29.4, 12.4, 8.8, 11.5, 7.2), T1),
    ("maskclip", "ViT-H-14", None, False): _row(_PX, (31.4, 13.3, 16.2, 41.7, 15.8, 8.4, 17.7, 10.4), T1),
    ("clip", "ViT-B-16", None, False): _row(_NA, (18.6, 7.8, 6.5, 49.1, 6.7, 11.2, 3.2, 5.7), N1),
    ("clip", "ViT-L-14", None, False): _row(_PX, (8.2, 4.1, 2.7, 15.6, 4.4, 2.4, 2.5, 1.7), T1),
    ("clip", "ViT-H-14", None, False): _row(_PX, (8.8, 5.0, 5.3, 21.7, 5.5, 3.2, 4.3, 2.8), T1),
}

# CASS (CVPR 2025): the main table of the paper as shown on the project page and in the official README
# (miou.png; CLIP ViT-B/16 OpenAI, DINO ViT-B/8, no post-processing)
PUBLISHED[("cass", "ViT-B-16", "dino_b8", False)] = _row(
    _PX, (65.8, 36.7, 37.8, 87.8, 40.2, 26.7, 39.4, 20.4), "CASS main table (project page / README figure)")


# ---- Trident (ICCV 2025): the official README's results table (assets/data_result.png), SAM refinement on; no
# ViT-L/14 row is published. Keyed by preset name (trident, trident_h14) and for the base preset with another CLIP.
_TR = "Trident README (assets/data_result.png), SAM refinement on"
for _m, _clip, _vals in (("trident", "ViT-B-16", (67.1, 38.6, 41.1, 84.5, 42.2, 28.3, 42.9, 21.9)),
                         ("trident", "ViT-H-14", (70.8, 40.1, 42.2, 88.7, 44.3, 28.6, 47.6, 26.7)),
                         ("trident_h14", "ViT-H-14", (70.8, 40.1, 42.2, 88.7, 44.3, 28.6, 47.6, 26.7))):
    PUBLISHED[(_m, _clip, "dino_b16", False)] = _row(_PX, _vals, _TR)


# CorrCLIP (ICCV 2025), README of the official code (CorrCLIPv1/README.md; the paper's Table 1 rows): MetaCLIP
# weights, DINO-B/8. "SAM2_32": masks generated offline (the authors' region_masks files, given with masks= /
# --masks); "SAM2_8": generated on the fly by SAM 2.0 Hiera-L with 8x8 points (mask_generator='sam2_hiera_l').
_CC = ("voc21", "voc20", "context59", "context60", "cityscapes", "ade20k", "coco_stuff", "coco_object")
_CCR = "CorrCLIP README (v1)"
_GIVEN = {"masks": "given"}
_SAM2_8 = {"masks": "generated", "mask_generator": "sam2_hiera_l", "mask_kwargs": {}}


def _cc(values, masks, settings, l14=False):
    return dict(_row(_CC, values, f"{_CCR}, {'ViT-L/14' if l14 else 'ViT-B/16'} {masks}"),
                clip_weights="metaclip_fullcc", settings=settings)


PUBLISHED.update({
    ("corrclip", "ViT-B-16", "dino_b8", False): [
        _cc((74.8, 88.8, 48.8, 44.2, 49.4, 26.9, 31.6, 43.7), "SAM2_32 (pre-generated masks)", _GIVEN),
        _cc((73.9, 87.6, 48.0, 43.7, 47.9, 26.5, 31.8, 43.6), "SAM2_8", _SAM2_8)],
    ("corrclip", "ViT-L-14", "dino_b8", False): [
        _cc((76.7, 91.5, 50.8, 44.9, 51.1, 30.7, 34.0, 49.4), "SAM2_32 (pre-generated masks)", _GIVEN, True),
        _cc((76.2, 91.2, 49.9, 44.2, 48.9, 29.8, 33.7, 49.0), "SAM2_8", _SAM2_8, True)],
})
PUBLISHED[("corrclip_l14", "ViT-L-14", "dino_b8", False)] = PUBLISHED[("corrclip", "ViT-L-14", "dino_b8", False)]


# SC-CLIP (IEEE TIP 2025) Table I and ResCLIP (CVPR 2025) Tables 1-2, without post-processing; order _PX.
_SC = "SC-CLIP Table I (arXiv 2411.15869; per-dataset values as reproduced by third parties, average 43.9 verified)"
_RC = "ResCLIP Tables 1-2 (CVPR 2025; the repository's figs/main_results_{w,wo}.png)"
PUBLISHED.update({
    ("scclip", "ViT-B-16", None, False): _row(_PX, (64.6, 36.8, 37.7, 84.3, 40.1, 26.6, 41.0, 20.1), _SC),
    ("scclip", "ViT-L-14", None, False): {"source": _SC, "miou": {"voc21": 65.0, "context60": 36.9,
                                                                  "coco_stuff": 26.9, "cityscapes": 41.3,
                                                                  "ade20k": 21.7}},
    ("resclip", "ViT-B-16", None, False): _row(_PX, (61.1, 33.5, 35.0, 86.0, 36.8, 24.7, 35.9, 18.0),
                                               _RC + " (NACLIP + ResCLIP)"),
    ("resclip_sclip", "ViT-B-16", None, False): _row(_PX, (60.7, 32.9, 34.3, 84.6, 35.8, 23.9, 34.4, 17.6),
                                                     _RC + " (SCLIP + ResCLIP)"),
    ("resclip_clearclip", "ViT-B-16", None, False): _row(_PX, (59.0, 32.9, 34.0, 87.1, 36.4, 24.3, 34.5, 17.8),
                                                         _RC + " (ClearCLIP + ResCLIP)"),
    ("resclip", "ViT-L-14", None, False): _row(_PX, (54.1, 30.9, 32.5, 85.5, 34.5, 23.4, 33.7, 18.2),
                                               _RC + " (NACLIP + ResCLIP)"),
    ("resclip_sclip", "ViT-L-14", None, False): _row(_PX, (52.8, 28.7, 30.9, 83.9, 30.6, 21.2, 32.2, 15.8),
                                                     _RC + " (SCLIP + ResCLIP)"),
    ("resclip_clearclip", "ViT-L-14", None, False): _row(_PX, (50.7, 29.8, 31.1, 84.2, 33.4, 22.3, 34.1, 17.9),
                                                         _RC + " (ClearCLIP + ResCLIP)"),
})


def published_for(method: str, clip: str, vfm: Optional[str], pamr: bool,
                  settings: Optional[Mapping[str, Any]] = None) -> Optional[dict]:
    """The published row for this configuration, if the papers report it, with the CLIP weights it used
    (the row's ``clip_weights``, else OpenAI for ViT-B/16, B/32 and L/14 and LAION-2B ``laion2b_s32b_b79k`` for
    ViT-H/14).

    A configuration may have several rows (a list) that differ in further settings: a row with ``"settings"``
    matches only when every one of them equals the value in ``settings`` (the method's options, plus ``"masks"``:
    ``"given"`` or ``"generated"`` for mask-guided methods)."""
    base = clip.replace("-quickgelu", "")
    rows = PUBLISHED.get((method, base, vfm, bool(pamr)))
    if rows is None:
        return None
    settings = settings or {}
    for row in rows if isinstance(rows, list) else [rows]:
        if all(settings.get(k) == v for k, v in row.get("settings", {}).items()):
            out = dict(row, clip=base)
            out.setdefault("clip_weights", "laion2b_s32b_b79k" if base == "ViT-H-14" else "openai")
            return out
    return None
