"""Backbones: the open_clip adapter and the VFM zoo. Importing this fills the VFM registry (no heavy imports)."""
from . import dino, dinov2, mae, sam, sd  # noqa: F401  (register their variants)
from .base import VFM, VFMS, VFMCfg, create_vfm, describe_vfms, get_vfm_cfg, list_vfms, register_vfm
from .clip import CLIPAdapter, create_clip, list_clip_architectures
from .hooks import Collect, Intermediates
from .protocol import CLIPS, CLIPBackbone, build_clip, list_registered_clips, register_clip
from .sam import SAMFeatures
from .timm_vit import TimmViTFeatures

__all__ = [
    "VFM", "VFMCfg", "get_vfm_cfg", "VFMS", "create_vfm", "list_vfms", "register_vfm", "describe_vfms",
    "CLIPAdapter", "create_clip", "list_clip_architectures", "TimmViTFeatures", "SAMFeatures",
    "CLIPBackbone", "CLIPS", "register_clip", "build_clip", "list_registered_clips", "Collect", "Intermediates",
]
