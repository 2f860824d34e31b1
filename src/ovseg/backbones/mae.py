"""MAE ViTs (He et al., CVPR 2022) via timm (docs/methods.md, "VFM features"): all blocks, then the final LayerNorm over
the patch tokens, (B, C, H/p, W/p). The pretrain checkpoints ``mae_pretrain_vit_*.pth`` (weights under
``model``) load directly. Position embeddings are resized to the input grid with plain bicubic to the target
size in fp32, as ProxyCLIP does when it loads the checkpoint for its crop size.
"""
from __future__ import annotations

from typing import Dict

import torch

from .base import VFMCfg, register_vfm
from .timm_vit import build_timm_vit

__all__ = ["convert_mae"]

def convert_mae(sd: Dict[str, torch.Tensor], model=None) -> Dict[str, torch.Tensor]:
    """The encoder keys already match timm; a decoder (visualisation checkpoints) is dropped."""
    return {k: v for k, v in sd.items() if not k.startswith("decoder") and k != "mask_token"}


for _name, _timm, _desc in (
    ("mae_b16", "vit_base_patch16_224.mae", "MAE ViT-B/16"),
    ("mae_l16", "vit_large_patch16_224.mae", "MAE ViT-L/16"),
    ("mae_h14", "vit_huge_patch14_224.mae", "MAE ViT-H/14"),
):
    register_vfm(VFMCfg(_name, build_timm_vit, doc=f"{_desc}: all blocks + final norm, patch tokens", timm_name=_timm,
                        pos_mode="size", convert=convert_mae))
