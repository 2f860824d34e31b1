"""DINOv2 ViTs (Oquab et al., 2023) and DINOv2 with registers (Darcet et al., ICLR 2024) via timm
(docs/methods.md, "VFM features"): last block with the final norm, CLS and register tokens dropped, (B, C, H/14, W/14).

Position embeddings follow the DINOv2 hub code (after fix e1277af, 2024-02), computed in fp32: the register
models resize to the target grid with antialiased bicubic; the plain models use the scale-factor rule with
offset 0.1 (bicubic, no antialias).
"""
from __future__ import annotations

from typing import Dict

import torch

from .base import register_vfm
from .timm_vit import build_timm_vit

__all__ = ["convert_dinov2"]

_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{s}14/{file}"


def convert_dinov2(sd: Dict[str, torch.Tensor], model) -> Dict[str, torch.Tensor]:
    """Meta's release layout (``mask_token``, ``register_tokens``, ``mlp.w12``/``w3`` for giant) -> timm, using
    timm's own converter."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(dict(sd), model)


_SIZES = {"s": ("small", "ViT-S/14"), "b": ("base", "ViT-B/14"), "l": ("large", "ViT-L/14"), "g": ("giant", "ViT-g/14")}

for _s, (_timm_size, _desc) in _SIZES.items():
    for _reg in (False, True):
        _name = f"dinov2_{_s}14" + ("_reg" if _reg else "")
        _file = f"dinov2_vit{_s}14" + ("_reg4" if _reg else "") + "_pretrain.pth"
        register_vfm(
            _name, build_timm_vit,
            doc=f"DINOv2 {_desc}" + (" with 4 registers" if _reg else "") + ": last-layer normed patch tokens",
            timm_name=f"vit_{_timm_size}_patch14_{'reg4_' if _reg else ''}dinov2.lvd142m",
            release_file=_file, release_url=_URL.format(s=_s, file=_file), vfm_name=_name,
            pos_mode="antialias" if _reg else "legacy", convert=convert_dinov2,
        )
