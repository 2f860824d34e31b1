"""Per-method, per-dataset evaluation settings exactly as the reference configs
(docs/evaluation.md, "Reference settings per method").

Each repository ships its own class-name files (they differ: NACLIP/SCLIP add synonyms for person and tvmonitor
and split on ", ", ProxyCLIP splits on "; " and uses ADE-847's comma-separated names whole). They live in
``ovseg/eval/classes``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Dict, List, Mapping, Optional

from ..errors import InvalidInputError
from ..text import LabelSet

__all__ = ["EvalPreset", "get_eval_preset", "read_class_file", "HARNESS"]


@dataclass(frozen=True)
class EvalPreset:
    class_file: str  # path inside ovseg/eval/classes
    separator: Optional[str]  # synonym separator of the reference repo; None: each line is one name
    short_side: int
    window: Optional[int]  # None: whole image
    stride: Optional[int]
    threshold: float = 0.0
    logit_scale: float = 40.0
    note: str = ""
    area_threshold: float = 0.0
    options: Mapping[str, Any] = field(default_factory=dict)  # the method's strategy options for this dataset


def _p(cls, sep, short, window, stride, thd=0.0, scale=40.0, note="", **kw):
    return EvalPreset(cls, sep, short, window, stride, thd, scale, note, **kw)


_PROXY = "; "
_NAC = ", "
PROXYCLIP: Dict[str, EvalPreset] = {
    "voc21": _p("proxyclip/voc21.txt", _PROXY, 336, 336, 112, 0.2),
    "context60": _p("shared_context60.txt", _PROXY, 336, 336, 112, 0.15),
    "coco_object": _p("proxyclip/coco_object.txt", _PROXY, 336, 336, 112, 0.25),
    "voc20": _p("proxyclip/voc20.txt", _PROXY, 336, 336, 112),
    "context59": _p("shared_context59.txt", _PROXY, 336, 336, 112),
    "coco_stuff": _p("shared_coco_stuff.txt", _PROXY, 336, 336, 112),
    "cityscapes": _p("shared_city_scapes.txt", _PROXY, 448, 224, 112,
                     note="the code uses 224 windows for Cityscapes (the paper says 336)"),
    "ade20k": _p("shared_ade20k.txt", _PROXY, 448, 336, 112),
    "pc459": _p("proxyclip/context459.txt", _PROXY, 448, 336, 112),
    "ade847": _p("proxyclip/ade847.txt", None, 448, 336, 112, note="comma-separated names used whole"),
}
NACLIP: Dict[str, EvalPreset] = {
    "voc21": _p("naclip/voc21.txt", _NAC, 336, None, None, 0.1, note="whole-image inference"),
    "context60": _p("shared_context60.txt", _NAC, 336, 224, 112, 0.1),
    "coco_object": _p("naclip/coco_object.txt", _NAC, 336, 224, 112, 0.1),
    "voc20": _p("naclip/voc20.txt", _NAC, 336, None, None, note="whole-image inference"),
    "cityscapes": _p("shared_city_scapes.txt", _NAC, 560, 224, 112),
    "context59": _p("shared_context59.txt", _NAC, 336, 224, 112),
    "ade20k": _p("shared_ade20k.txt", _NAC, 336, 224, 112),
    "coco_stuff": _p("shared_coco_stuff.txt", _NAC, 336, 224, 112, note="NACLIP v2 (v1 used a 448 short side)"),
}
SCLIP: Dict[str, EvalPreset] = {
    "voc21": _p("naclip/voc21.txt", _NAC, 336, 224, 112, 0.1, 65.0, area_threshold=0.1),
    "context60": _p("shared_context60.txt", _NAC, 336, 224, 112, 0.1, 50.0),
    "coco_object": _p("naclip/coco_object.txt", _NAC, 336, 224, 112, 0.1, 50.0),
    "voc20": _p("naclip/voc20.txt", _NAC, 336, 224, 112),
    "cityscapes": _p("shared_city_scapes.txt", _NAC, 560, 224, 112),
    "context59": _p("shared_context59.txt", _NAC, 336, 224, 112),
    "ade20k": _p("shared_ade20k.txt", _NAC, 336, 224, 112),
    "coco_stuff": _p("shared_coco_stuff.txt", _NAC, 448, 224, 112),
}
# The SCLIP/NACLIP harness (224/112 windows, SCLIP's class files) for the baselines, with their own logit scale.
BASELINE: Dict[str, EvalPreset] = {k: dataclasses.replace(v, logit_scale=40.0, area_threshold=0.0)
                                   for k, v in SCLIP.items()}

HARNESS = {"proxyclip": PROXYCLIP, "naclip": NACLIP, "sclip": SCLIP, "clearclip": BASELINE, "maskclip": BASELINE,
           "clip": BASELINE}

# CorrCLIP v1's configs (ProxyCLIP's harness; its own class files: "people" for "person", and COCO-Object's
# background without "bed"); mask files per benchmark: ovseg.masks.REGION_MASK_FOLDERS
_CC = "corrclip/"
CORRCLIP: Dict[str, EvalPreset] = {
    "voc21": _p(_CC + "voc21.txt", _PROXY, 336, 336, 112, 0.2),
    "voc20": _p(_CC + "voc20.txt", _PROXY, 336, 336, 112),
    "context60": _p(_CC + "context60.txt", _PROXY, 336, 336, 112, 0.15),
    "context59": _p(_CC + "context59.txt", _PROXY, 336, 336, 112),
    "cityscapes": _p(_CC + "city_scapes.txt", _PROXY, 448, 224, 112),
    "ade20k": _p(_CC + "ade20k.txt", _PROXY, 448, 336, 112),
    "coco_stuff": _p(_CC + "coco_stuff.txt", _PROXY, 336, 336, 112),
    "coco_object": _p(_CC + "coco_object.txt", _PROXY, 336, 336, 112, 0.25),
}
HARNESS.update(corrclip=CORRCLIP, corrclip_l14=CORRCLIP)

# SC-CLIP (SuleBai/SC-CLIP configs): SCLIP's harness (NACLIP's class files, byte-identical), 224/112 windows,
# VOC21 with logit scale 50, prob_thd 0.15 and the area filter, COCO-Object 55 / 0.35, Context60 0.15.
SCCLIP: Dict[str, EvalPreset] = {
    "voc21": _p("naclip/voc21.txt", _NAC, 336, 224, 112, 0.15, 50.0, area_threshold=0.1),
    "context60": _p("shared_context60.txt", _NAC, 336, 224, 112, 0.15),
    "coco_object": _p("naclip/coco_object.txt", _NAC, 336, 224, 112, 0.35, 55.0),
    "voc20": _p("naclip/voc20.txt", _NAC, 336, 224, 112),
    "context59": _p("shared_context59.txt", _NAC, 336, 224, 112),
    "coco_stuff": _p("shared_coco_stuff.txt", _NAC, 336, 224, 112),
    "cityscapes": _p("shared_city_scapes.txt", _NAC, 560, 224, 112),
    "ade20k": _p("shared_ade20k.txt", _NAC, 336, 224, 112),
}


def _res(cls, short, window, thd, temp, rcs, sfr, note=""):
    stride = 112 if window else None
    return _p(cls, _NAC, short, window, stride, thd, 40.0, note,
              options={"temp_thd": temp, "rcs_mix": rcs, "sfr_mix": sfr})


# ResCLIP (yvhangyang/ResCLIP configs): NACLIP's harness (whole-image VOC21/VOC20) with per-dataset first-pass
# threshold and RCS/SFR (tau, lambda); one set for every base method.
RESCLIP: Dict[str, EvalPreset] = {
    "voc21": _res("naclip/voc21.txt", 336, None, 0.1, 0.50, (2.0, 0.3), (2.2, 0.7), "whole-image inference"),
    "context60": _res("shared_context60.txt", 336, 224, 0.1, 0.30, (2.0, 0.3), (1.8, 0.7)),
    "coco_object": _res("naclip/coco_object.txt", 336, 224, 0.1, 0.11, (2.0, 0.4), (1.8, 0.7)),
    "voc20": _res("naclip/voc20.txt", 336, None, 0.0, 0.10, (2.0, 0.6), (2.1, 0.6), "whole-image inference"),
    "context59": _res("shared_context59.txt", 336, 224, 0.0, 0.25, (2.0, 0.4), (1.8, 0.7)),
    "coco_stuff": _res("shared_coco_stuff.txt", 336, 224, 0.0, 0.11, (2.0, 0.4), (1.8, 0.7)),
    "cityscapes": _res("shared_city_scapes.txt", 560, 224, 0.0, 0.10, (2.0, 0.2), (2.1, 0.6)),
    "ade20k": _res("shared_ade20k.txt", 336, 224, 0.0, 0.25, (2.0, 0.3), (2.1, 0.7)),
}
HARNESS.update(scclip=SCCLIP, resclip=RESCLIP, resclip_sclip=RESCLIP, resclip_clearclip=RESCLIP)


# ---- Trident (ICCV 2025): configs/cfg_*.py over configs/base_config.py of the official code. Whole-image mode
# (the strategy cuts its own 336 sub-images with ``slide_stride``); the class files are ProxyCLIP's (identical).
def _tri(cls, short, stride, thd, cos_fac, neg, tau, note="", sep=_PROXY, **opts):
    return EvalPreset(cls, sep, short, None, None, thd, 40.0, note, options=dict(
        slide_stride=stride, cos_fac=cos_fac, refine_neg_cos=neg, coarse_thresh=tau, sam_halves=False, **opts))


TRIDENT: Dict[str, EvalPreset] = {
    "voc21": _tri("proxyclip/voc21.txt", 448, 224, 0.2, 1.2, True, 0.2),
    "context60": _tri("shared_context60.txt", 576, 224, 0.15, 1.2, True, 0.15),
    "coco_object": _tri("proxyclip/coco_object.txt", 448, 224, 0.25, 1.2, True, 0.25),
    "voc20": _tri("proxyclip/voc20.txt", 336, 112, 0.0, 0.0, True, 0.2),
    "context59": _tri("shared_context59.txt", 576, 224, 0.0, 1.2, True, 0.15),
    "coco_stuff": _tri("shared_coco_stuff.txt", 448, 224, 0.0, 1.2, True, 0.05),
    "cityscapes": dataclasses.replace(
        _tri("shared_city_scapes.txt", 688, 224, 0.0, 3.0, False, 0.1),
        note="SAM runs on the left and right halves of the picture (the reference's Cityscapes rule)",
        options=dict(slide_stride=224, cos_fac=3.0, refine_neg_cos=False, coarse_thresh=0.1, sam_halves=True)),
    "ade20k": _tri("shared_ade20k.txt", 576, 224, 0.0, 1.2, False, 0.05),
    "pc459": _tri("proxyclip/context459.txt", 448, 224, 0.0, 1.2, True, 0.2, note="not in the official eval_all"),
    "ade847": _tri("proxyclip/ade847.txt", 448, 224, 0.0, 1.2, True, 0.2, sep=None,
                   note="not in the official eval_all; comma-separated names used whole"),
}
HARNESS.update({"trident": TRIDENT, "trident_l14": TRIDENT, "trident_h14": TRIDENT})


# CASS (CVPR 2025), the official configs/cfg_*.py and cass_segmentor.py: NACLIP's harness and class files (byte-
# identical), 224/112 windows except VOC21 (whole image), per-dataset prior weights β (global_semantics_weight),
# α (mean_vector_weight), h_threshold; eigenscaling off for VOC20 and Cityscapes (gated on the dataset name);
# Cityscapes' prior uses each window's own CLS (its config passes no whole image), VOC21's is the image itself.
def _cass(cls, short, window, thd, beta, alpha, h_thr, eig=True, prior="image", note=""):
    opts = {"beta": beta, "alpha": alpha, "h_threshold": h_thr, "eigenscaling": eig, "prior_cls": prior}
    return _p(cls, _NAC, short, window, 112 if window else None, thd, note=note, options=opts)


CASS: Dict[str, EvalPreset] = {
    "voc21": _cass("naclip/voc21.txt", 336, None, 0.1, 0.10, 0.03, 0.10,
                   note="whole-image inference (the reference runs it in fp16 up to the softmax)"),
    "context60": _cass("shared_context60.txt", 336, 224, 0.1, 0.25, 0.04, 0.09),
    "coco_object": _cass("naclip/coco_object.txt", 336, 224, 0.1, 0.25, 0.01, 0.10),
    "voc20": _cass("naclip/voc20.txt", 336, 224, 0.0, 0.40, 0.02, 0.10, eig=False,
                   note="sliding windows (NACLIP: whole image); no eigenscaling"),
    "context59": _cass("shared_context59.txt", 336, 224, 0.0, 0.25, 0.04, 0.09),
    "coco_stuff": _cass("shared_coco_stuff.txt", 336, 224, 0.0, 0.20, 0.02, 0.02),
    "cityscapes": _cass("shared_city_scapes.txt", 560, 224, 0.0, 0.10, 0.03, 0.14, eig=False, prior="window",
                        note="no eigenscaling; the prior uses each window's own CLS"),
    "ade20k": _cass("shared_ade20k.txt", 336, 224, 0.0, 0.30, 0.05, 0.06),
}
HARNESS["cass"] = CASS


def get_eval_preset(method: str, dataset: str) -> EvalPreset:
    table = HARNESS.get(method, BASELINE)
    if dataset not in table:
        raise InvalidInputError(f"method '{method}' has no reference settings for dataset '{dataset}'; "
                                f"it has: {', '.join(table)}")
    return table[dataset]


def read_class_file(name: str, separator: Optional[str]) -> LabelSet:
    """Parse a reference class file like the references: line i is class i, split on ``separator``, only the
    newline removed (the tokenizer cleans the rest)."""
    text = resources.files("ovseg.eval").joinpath("classes", name).read_text(encoding="utf-8")
    names: List[str] = []
    queries: List[str] = []
    query_class: List[int] = []
    for c, line in enumerate(text.split("\n")):
        syns = line.split(separator) if separator else [line]
        names.append(syns[0].strip())
        for s in syns:
            queries.append(s)
            query_class.append(c)
    return LabelSet(tuple(names), tuple(queries), tuple(query_class))
