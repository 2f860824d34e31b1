"""Benchmark datasets in the folder layouts MMSegmentation's (and CAT-Seg's) preparation scripts produce
(docs/evaluation.md). Ground truth is read at its original resolution; ``reduce_zero_label`` follows mmseg
(0 -> 255, others -1, 255 stays 255)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from torchvision.datasets import VisionDataset

from ..errors import InvalidInputError, PathNotFoundError

__all__ = ["DatasetSpec", "DATASETS", "SegmentationFolder", "get_dataset_spec", "list_datasets"]


@dataclass(frozen=True)
class DatasetSpec:
    """Where a benchmark's images and labels live under its root, and how labels are read."""

    name: str
    num_classes: int
    img_dir: str
    ann_dir: str
    img_suffix: str
    ann_suffix: str
    split_file: Optional[str]  # ids, one per line (relative to the root); None: every image with a label
    reduce_zero_label: bool
    root_hint: str
    nested: bool = False  # images in sub-folders (Cityscapes cities)
    ignore_index: int = 255
    description: str = ""


DATASETS = {s.name: s for s in (
    DatasetSpec("voc21", 21, "JPEGImages", "SegmentationClass", ".jpg", ".png", "ImageSets/Segmentation/val.txt",
                False, "VOCdevkit/VOC2012", description="PASCAL VOC 2012 val, background + 20 classes"),
    DatasetSpec("voc20", 20, "JPEGImages", "SegmentationClass", ".jpg", ".png", "ImageSets/Segmentation/val.txt",
                True, "VOCdevkit/VOC2012", description="PASCAL VOC 2012 val, 20 classes (background ignored)"),
    DatasetSpec("context60", 60, "JPEGImages", "SegmentationClassContext", ".jpg", ".png",
                "ImageSets/SegmentationContext/val.txt", False, "VOCdevkit/VOC2010",
                description="PASCAL Context val, background + 59 classes"),
    DatasetSpec("context59", 59, "JPEGImages", "SegmentationClassContext", ".jpg", ".png",
                "ImageSets/SegmentationContext/val.txt", True, "VOCdevkit/VOC2010",
                description="PASCAL Context val, 59 classes (background ignored)"),
    DatasetSpec("coco_object", 81, "images/val2017", "annotations/val2017", ".jpg", "_instanceTrainIds.png", None,
                False, "coco_stuff164k", description="COCO-Object val2017 (background + 80 things; see "
                "'ovseg convert-coco-object')"),
    DatasetSpec("coco_stuff", 171, "images/val2017", "annotations/val2017", ".jpg", "_labelTrainIds.png", None,
                False, "coco_stuff164k", description="COCO-Stuff-164k val2017, 171 classes"),
    DatasetSpec("cityscapes", 19, "leftImg8bit/val", "gtFine/val", "_leftImg8bit.png", "_gtFine_labelTrainIds.png",
                None, False, "cityscapes", nested=True, description="Cityscapes val, 19 classes"),
    DatasetSpec("ade20k", 150, "images/validation", "annotations/validation", ".jpg", ".png", None, True,
                "ADEChallengeData2016", description="ADE20K val, 150 classes"),
    DatasetSpec("ade847", 847, "images_detectron2/validation", "annotations_detectron2/validation", ".jpg", ".tif",
                "validation.txt", False, "ADE20K_2021_17_01",
                description="ADE20K-Full val, 847 classes (CAT-Seg layout, uint16 .tif labels)"),
    DatasetSpec("pc459", 459, "JPEGImages", "annotations_detectron2/pc459_val", ".jpg", ".tif",
                "ImageSets/SegmentationContext/val.txt", False, "VOCdevkit/VOC2010",
                description="PASCAL Context-459 val (CAT-Seg layout, uint16 .tif labels)"),
)}


def list_datasets() -> List[str]:
    return list(DATASETS)


def get_dataset_spec(name: str) -> DatasetSpec:
    from .._registry import suggest

    if name not in DATASETS:
        raise InvalidInputError(f"unknown dataset '{name}';{suggest(name, DATASETS)} known: {', '.join(DATASETS)}")
    return DATASETS[name]


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's rule: 0 -> 255 (ignored), every other value -1, and 255 stays 255."""
    out = label.astype(np.int64)
    zero = out == 0
    out = out - 1
    out[zero] = 255
    out[out == 254] = 255
    return out


class SegmentationFolder(VisionDataset):
    """Image/label pairs of one benchmark under ``root`` (a torchvision ``VisionDataset``).

    ``dataset[i]`` -> (RGB uint8 numpy (H, W, 3), label int64 numpy (H, W)); ``samples[i]`` = (id, image, label).
    """

    def __init__(self, name: str, root: str):
        super().__init__(os.path.expanduser(str(root)))
        self.spec = get_dataset_spec(name)
        base = Path(self.root)
        if not base.is_dir():
            raise PathNotFoundError(f"dataset root not found: '{root}' (expected the {self.spec.root_hint} folder "
                                    f"for '{name}')")
        img_dir, ann_dir = base / self.spec.img_dir, base / self.spec.ann_dir
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise PathNotFoundError(f"'{name}': folder '{d}' not found; --root must be the {self.spec.root_hint} "
                                        f"folder prepared as MMSegmentation does (images in {self.spec.img_dir}/, "
                                        f"labels in {self.spec.ann_dir}/)")
        self.samples: List[Tuple[str, Path, Path]] = self._collect(base, img_dir, ann_dir)
        if not self.samples:
            raise InvalidInputError(f"'{name}': no image/label pairs found under '{root}'")

    def _collect(self, base: Path, img_dir: Path, ann_dir: Path) -> List[Tuple[str, Path, Path]]:
        s = self.spec
        split = base / s.split_file if s.split_file else None
        if split is not None and split.is_file():
            ids = [ln.strip() for ln in split.read_text().splitlines() if ln.strip()]
        else:
            pattern = f"*/*{s.img_suffix}" if s.nested else f"*{s.img_suffix}"
            ids = sorted(str(p.relative_to(img_dir))[: -len(s.img_suffix)] for p in img_dir.glob(pattern))
        out = []
        for i in ids:
            img, ann = img_dir / f"{i}{s.img_suffix}", ann_dir / f"{i}{s.ann_suffix}"
            if not img.is_file():
                raise PathNotFoundError(f"'{s.name}': image '{img}' listed in {s.split_file} is missing")
            if not ann.is_file():
                if split is not None and split.is_file():
                    raise PathNotFoundError(f"'{s.name}': label '{ann}' is missing")
                continue  # unlabelled image in a listing-based dataset
            out.append((i, img, ann))
        return out

    def __len__(self) -> int:
        return len(self.samples)

    def load_label(self, index: int) -> np.ndarray:
        """Ground truth at the original resolution, int64, after ``reduce_zero_label``."""
        from PIL import Image

        with Image.open(self.samples[index][2]) as im:
            label = np.array(im)
        if label.ndim == 3:  # an RGB-saved label: take the first channel (mmseg's 'unchanged' + squeeze)
            label = label[..., 0]
        label = label.astype(np.int64)
        return reduce_zero_label(label) if self.spec.reduce_zero_label else label

    def __getitem__(self, index: int):
        from ..preprocess import load_image

        return load_image(str(self.samples[index][1])), self.load_label(index)
