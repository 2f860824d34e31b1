"""DINOv2 ViTs (Oquab et al., 2023) and DINOv2 with registers (Darcet et al., ICLR 2024) via timm
(docs/methods.md, "VFM features"): last block with the final norm, CLS and register tokens dropped, (B, C, H/14, W/14).

Position embeddings follow the DINOv2 hub code (after fix e1277af, 2024-02), computed in fp32: the register
models resize to the target grid with antialiased bicubic; the plain models use the scale-factor rule with
offset 0.1 (bicubic, no antialias).
"""
from __future__ import annotations

from typing import Dict

import torch

from .base import VFMCfg, register_vfm
from .timm_vit import build_timm_vit

__all__ = ["convert_dinov2"]

def convert_dinov2(sd: Dict[str, torch.Tensor], model) -> Dict[str, torch.Tensor]:
    """Meta's release layout (``mask_token``, ``register_tokens``, ``mlp.w12``/``w3`` for giant) -> timm, using
    timm's own converter."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(dict(sd), model)


_SIZES = {"s": ("small", "ViT-S/14"), "b": ("base", "ViT-B/14"), "l": ("large", "ViT-L/14"), "g": ("giant", "ViT-g/14")}

for _s, (_timm_size, _desc) in _SIZES.items():
    for _reg in (False, True):
        register_vfm(VFMCfg(
            f"dinov2_{_s}14" + ("_reg" if _reg else ""), build_timm_vit,
            doc=f"DINOv2 {_desc}" + (" with 4 registers" if _reg else "") + ": last-layer normed patch tokens",
            timm_name=f"vit_{_timm_size}_patch14_{'reg4_' if _reg else ''}dinov2.lvd142m",
            pos_mode="antialias" if _reg else "legacy", convert=convert_dinov2))
