"""COCO-Object ground truth from COCO-Stuff-164k, as the references define it (GroupViT's converter, used
verbatim by NACLIP/ProxyCLIP; docs/evaluation.md): the 80 thing classes become 1..80 in COCO-Stuff's train-id
order, everything else (stuff classes and the 255 'unlabelled') becomes 0 = background, so COCO-Object has no
ignored pixels."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ..errors import InvalidInputError, PathNotFoundError

__all__ = ["COCO_THING_IDS", "coco_object_lut", "convert_mask", "convert_coco_object"]

# Raw COCO-Stuff label values (COCO category id - 1) of the 80 thing classes, in train-id order.
COCO_THING_IDS = (
    tuple(range(0, 11)) + tuple(range(12, 25)) + (26, 27) + tuple(range(30, 44)) + tuple(range(45, 65)) + (66, 69)
    + tuple(range(71, 82)) + tuple(range(83, 90))
)
assert len(COCO_THING_IDS) == 80


def coco_object_lut(source: str = "raw") -> np.ndarray:
    """256-entry lookup table. ``raw``: the original ``stuffthingmaps`` values; ``labelTrainIds``: mmseg's
    ``*_labelTrainIds.png`` (things 0..79, stuff 80..170, 255)."""
    lut = np.zeros(256, dtype=np.uint8)  # stuff and 255 -> background
    if source == "raw":
        lut[:91] = np.arange(91, dtype=np.uint8)  # unused thing ids stay as they are (never present in the data)
        for train_id, raw in enumerate(COCO_THING_IDS):
            lut[raw] = train_id + 1
    elif source == "labelTrainIds":
        lut[:80] = np.arange(1, 81, dtype=np.uint8)
    else:
        raise InvalidInputError(f"source must be 'raw' or 'labelTrainIds', got {source!r}")
    return lut


def convert_mask(mask: np.ndarray, source: str = "raw") -> np.ndarray:
    return coco_object_lut(source)[mask.astype(np.uint8)]


def convert_coco_object(root: str, splits: Iterable[str] = ("val2017",), out_dir: Optional[str] = None,
                        progress: bool = True) -> int:
    """Write ``annotations/<split>/<id>_instanceTrainIds.png`` for every raw ``<id>.png`` (or, when the raw maps are
    absent, every ``<id>_labelTrainIds.png``). Returns the number of files written."""
    from PIL import Image

    root_p = Path(root).expanduser()
    out_root = Path(out_dir).expanduser() if out_dir else root_p
    n = 0
    for split in splits:
        ann = root_p / "annotations" / split
        if not ann.is_dir():
            raise PathNotFoundError(f"'{ann}' not found: --root must be the coco_stuff164k folder")
        raw = sorted(p for p in ann.glob("*.png") if "TrainIds" not in p.name)
        files, source = (raw, "raw") if raw else (sorted(ann.glob("*_labelTrainIds.png")), "labelTrainIds")
        dest = out_root / "annotations" / split
        dest.mkdir(parents=True, exist_ok=True)
        it = files
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(files, desc=f"coco_object {split}", unit="img")
        for p in it:
            stem = p.name[: -len("_labelTrainIds.png")] if source == "labelTrainIds" else p.stem
            with Image.open(p) as im:
                mask = np.array(im)
            Image.fromarray(convert_mask(mask, source)).save(dest / f"{stem}_instanceTrainIds.png")
            n += 1
    return n
