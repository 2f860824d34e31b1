"""DINO v1 ViTs (Caron et al., ICCV 2021) via timm, as ProxyCLIP's default VFM (METHODS_SPEC.md §3.3).

Features: the last block's output with the final LayerNorm, CLS dropped, as (B, C, H/p, W/p). Position
embeddings are resized like DINO's own ``interpolate_pos_encoding`` (bicubic, scale factor (g+0.1)/g0).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..pos_embed import interpolate_pos_embed
from ..weights import WeightsUnavailableError, load_state_dict_file, seeded
from .base import VFM, register_vfm

logger = logging.getLogger(__name__)

__all__ = ["TimmViTFeatures", "build_timm_vit"]

_DINO_URL = "https://dl.fbaipublicfiles.com/dino/{stem}/{stem}.pth"


class TimmViTFeatures(VFM):
    """A timm ``VisionTransformer`` (one CLS token, learned absolute positions) as a dense feature extractor."""

    def __init__(self, vit: nn.Module, *, name: str = "vit"):
        super().__init__()
        if getattr(vit, "num_prefix_tokens", 1) != 1 or getattr(vit, "no_embed_class", False):
            raise ValueError(f"{name}: expected a ViT with exactly one CLS token and a CLS position embedding")
        self.vit = vit
        self.name = name
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = int(vit.embed_dim)
        self.base_grid: Tuple[int, int] = tuple(vit.patch_embed.grid_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        p = self.patch_size
        x = x[..., : x.shape[-2] // p * p, : x.shape[-1] // p * p]  # the conv stem floors (as DINO's does)
        x = vit.patch_embed(x)  # (B, h, w, C) with dynamic_img_size
        if x.dim() == 3:  # static patch embed (B, N, C)
            raise RuntimeError("build the timm ViT with dynamic_img_size=True")
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        pos = vit.pos_embed[0]  # (1 + N0, C)
        pos = torch.cat([pos[:1], interpolate_pos_embed(pos[1:], self.base_grid, (h, w))], dim=0)
        x = torch.cat([vit.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1) + pos.to(x.dtype)
        x = vit.norm_pre(vit.pos_drop(x))
        x = vit.blocks(x)
        x = vit.norm(x)
        return x[:, 1:].transpose(1, 2).reshape(b, c, h, w)


def _clean_dino_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Accept DINO's backbone release files and its full training checkpoints (teacher weights)."""
    if "teacher" in sd and isinstance(sd["teacher"], dict):
        sd = sd["teacher"]
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("head."):  # projection head of the training checkpoint
            continue
        out[k] = v
    return out


def build_timm_vit(
    *,
    timm_name: str,
    release_file: str,
    release_url: str,
    weights: Any = None,
    seed: int = 0,
    model_kwargs: Optional[Dict[str, Any]] = None,
    vfm_name: str = "vfm",
) -> TimmViTFeatures:
    """Build a timm ViT with the official weights (``None``), ``"random"`` ones, or a local release file."""
    import timm

    kwargs = dict(num_classes=0, dynamic_img_size=True)
    kwargs.update(model_kwargs or {})
    if weights is None:
        try:
            vit = timm.create_model(timm_name, pretrained=True, **kwargs)
        except Exception as e:
            raise WeightsUnavailableError(
                f"could not load the weights of VFM '{vfm_name}' (timm '{timm_name}', {type(e).__name__}). "
                f"Download {release_file} from {release_url} on a connected machine and pass its local path "
                f"with vfm_weights=PATH (CLI: --vfm-weights PATH)."
            ) from None
    else:
        with seeded(seed):
            vit = timm.create_model(timm_name, pretrained=False, **kwargs)
        if not (isinstance(weights, str) and weights == "random"):
            if not isinstance(weights, (str, os.PathLike)):
                raise TypeError(f"vfm_weights must be None, 'random' or a path, got {type(weights).__name__}")
            sd = _clean_dino_state_dict(load_state_dict_file(weights, option="vfm_weights"))
            try:
                missing, unexpected = vit.load_state_dict(sd, strict=False)
            except RuntimeError as e:  # shape mismatch
                raise ValueError(f"vfm_weights '{weights}' does not fit VFM '{vfm_name}': "
                                 f"{str(e).splitlines()[-1].strip()}") from None
            if missing or unexpected:
                raise ValueError(
                    f"vfm_weights '{weights}' does not fit VFM '{vfm_name}': {len(missing)} missing keys "
                    f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); expected "
                    f"the official {release_file}"
                )
            logger.info("loaded %s weights from %s", vfm_name, weights)
    return TimmViTFeatures(vit, name=vfm_name)


_DINO_VARIANTS = {
    # name: (timm model, release file stem, description)
    "dino_s16": ("vit_small_patch16_224.dino", "dino_deitsmall16_pretrain", "DINO ViT-S/16"),
    "dino_s8": ("vit_small_patch8_224.dino", "dino_deitsmall8_pretrain", "DINO ViT-S/8"),
    "dino_b16": ("vit_base_patch16_224.dino", "dino_vitbase16_pretrain", "DINO ViT-B/16"),
    "dino_b8": ("vit_base_patch8_224.dino", "dino_vitbase8_pretrain", "DINO ViT-B/8 (ProxyCLIP default)"),
}

for _name, (_timm, _stem, _doc) in _DINO_VARIANTS.items():
    register_vfm(
        _name, build_timm_vit, doc=f"{_doc}: last-layer normed patch tokens",
        timm_name=_timm, release_file=f"{_stem}.pth", release_url=_DINO_URL.format(stem=_stem), vfm_name=_name,
    )
