"""ovseg: training-free open-vocabulary semantic segmentation with frozen CLIP, in pure PyTorch."""
from __future__ import annotations

__version__ = "0.1.0"

from .attention import list_attentions
from .backbones import list_vfms, register_vfm
from .methods import list_methods
from .result import SegmentationResult
from .segmenter import Segmenter
from .strategies import list_strategies

list_backbones = list_vfms

__all__ = [
    "Segmenter", "SegmentationResult", "list_methods", "list_vfms", "list_backbones", "list_attentions",
    "register_vfm", "list_strategies", "__version__",
]
