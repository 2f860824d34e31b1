"""Segment Anything image encoders (Kirillov et al., ICCV 2023) via timm's ``samvit_*``
(docs/methods.md, "VFM features").

The (ImageNet-normalised) crop is *stretched* to 1024x1024 (bilinear, align_corners False; not SAM's
pad-to-square) and the 256-channel neck output (B, 256, 64, 64) is the feature map, whatever the crop's shape.
Meta's release files ``sam_vit_{b,l,h}_*.pth`` load directly (the image-encoder keys are mapped with timm's
converter; prompt encoder and mask decoder are ignored).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import VFM, VFMCfg, register_vfm
from .timm_vit import create_timm_model

__all__ = ["SAMFeatures", "build_sam"]

class SAMFeatures(VFM):
    """SAM ViT image encoder + neck as a VFM with a fixed (input_size/16)² grid."""

    def __init__(self, vit: nn.Module, *, name: str = "sam"):
        super().__init__()
        self.vit = vit
        self.name = name
        self.input_size: Tuple[int, int] = tuple(vit.patch_embed.img_size)
        p = int(vit.patch_embed.patch_size[0])
        self.patch_size = p  # stride at the stretched input
        neck_out = [m for m in vit.neck.modules() if isinstance(m, nn.Conv2d)]
        self.embed_dim = int(neck_out[-1].out_channels) if neck_out else int(vit.embed_dim)
        self.width = int(vit.embed_dim)  # internal token width (for memory estimates)
        self._grid = (self.input_size[0] // p, self.input_size[1] // p)

    def grid_size(self, height: int, width: int) -> Tuple[int, int]:
        return self._grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        return self.vit.forward_features(x)  # (B, 256, 64, 64)


def convert_sam(sd: Dict[str, torch.Tensor], model=None) -> Dict[str, torch.Tensor]:
    from timm.models.vision_transformer_sam import checkpoint_filter_fn

    return checkpoint_filter_fn(sd, model)


def build_sam(*, cfg: VFMCfg, weights: Any = None, seed: int = 0,
              model_kwargs: Optional[Dict[str, Any]] = None) -> SAMFeatures:
    """SAM's image encoder (timm ``samvit``) of ``cfg`` as a VFM; Meta's release files load directly."""
    # Meta's image encoder uses LayerNorm eps 1e-6; timm's samvit constructor defaults to nn.LayerNorm (1e-5), a
    # 0.7 % difference on SAM's values: ask for the release's eps explicitly
    kwargs = dict(num_classes=0, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    vit = create_timm_model(timm_name=cfg.timm_name, release_file=cfg.release_file, release_url=cfg.release_url,
                            weights=weights, seed=seed, kwargs=kwargs, model_kwargs=model_kwargs,
                            vfm_name=cfg.name, convert=cfg.convert)
    feats = SAMFeatures(vit, name=cfg.name)
    feats.mean, feats.std = tuple(cfg.mean), tuple(cfg.std)
    return feats


for _name, _timm, _desc in (
    ("sam_b16", "samvit_base_patch16.sa1b", "SAM ViT-B"),
    ("sam_l16", "samvit_large_patch16.sa1b", "SAM ViT-L"),
    ("sam_h16", "samvit_huge_patch16.sa1b", "SAM ViT-H"),
):
    register_vfm(VFMCfg(_name, build_sam, doc=f"{_desc} image encoder: 256-channel neck output at 64x64",
                        timm_name=_timm, convert=convert_sam))
