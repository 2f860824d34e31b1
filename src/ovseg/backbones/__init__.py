"""Backbones: the open_clip adapter and the VFM zoo. Importing this fills the VFM registry (no heavy imports)."""
from .base import VFM, VFMS, create_vfm, describe_vfms, list_vfms, register_vfm
from .clip import CLIPAdapter, create_clip, list_clip_architectures
from . import dino  # noqa: F401  (registers dino_*)
from .dino import TimmViTFeatures

__all__ = [
    "VFM", "VFMS", "create_vfm", "list_vfms", "register_vfm", "describe_vfms",
    "CLIPAdapter", "create_clip", "list_clip_architectures", "TimmViTFeatures",
]
