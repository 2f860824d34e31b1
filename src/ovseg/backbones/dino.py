"""DINO v1 ViTs (Caron et al., ICCV 2021) via timm, ProxyCLIP's default VFM (docs/methods.md, "VFM features").

Features: the last block's output with the final LayerNorm, CLS dropped, as (B, C, H/p, W/p). Position
embeddings are resized like DINO's own ``interpolate_pos_encoding`` (bicubic, scale factor (g+0.1)/g0).
"""
from __future__ import annotations

from typing import Dict

import torch

from .base import VFMCfg, register_vfm
from .timm_vit import TimmViTFeatures, build_timm_vit

__all__ = ["TimmViTFeatures", "convert_dino"]

def convert_dino(sd: Dict[str, torch.Tensor], model=None) -> Dict[str, torch.Tensor]:
    """DINO's backbone release files already use timm's names; full training checkpoints keep the teacher
    under ``teacher`` with ``backbone.``/``module.`` prefixes and a projection ``head`` (dropped)."""
    if "teacher" in sd and isinstance(sd["teacher"], dict):
        sd = sd["teacher"]
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if not k.startswith("head."):
            out[k] = v
    return out


_VARIANTS = {
    # name: (timm model, description); release files, URLs and normalisation come from timm's pretrained configs
    "dino_s16": ("vit_small_patch16_224.dino", "DINO ViT-S/16"),
    "dino_s8": ("vit_small_patch8_224.dino", "DINO ViT-S/8"),
    "dino_b16": ("vit_base_patch16_224.dino", "DINO ViT-B/16"),
    "dino_b8": ("vit_base_patch8_224.dino", "DINO ViT-B/8 (ProxyCLIP default)"),
}

for _name, (_timm, _doc) in _VARIANTS.items():
    register_vfm(VFMCfg(_name, build_timm_vit, doc=f"{_doc}: last-layer normed patch tokens", timm_name=_timm,
                        pos_mode="legacy", convert=convert_dino))
