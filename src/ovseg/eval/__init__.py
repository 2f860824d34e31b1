"""Benchmark evaluation (the papers' eight datasets plus ADE-847 and PC-459): datasets, reference presets,
mIoU, published numbers, and the ``ovseg eval`` runner (single process or torchrun)."""
from .coco_object import convert_coco_object
from .datasets import DATASETS, SegmentationFolder, get_dataset_spec, list_datasets
from .metrics import ConfusionMatrix, metrics_from_confusion
from .presets import get_eval_preset, read_class_file
from .published import PAPER_DATASETS, PUBLISHED, published_for
from .runner import evaluate_dataset, run_eval, run_suite

__all__ = [
    "DATASETS", "SegmentationFolder", "get_dataset_spec", "list_datasets", "ConfusionMatrix",
    "metrics_from_confusion", "get_eval_preset", "read_class_file", "PAPER_DATASETS", "PUBLISHED", "published_for",
    "evaluate_dataset", "run_eval", "run_suite", "convert_coco_object",
]
