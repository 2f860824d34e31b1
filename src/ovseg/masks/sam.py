"""Segment Anything (Kirillov et al., ICCV 2023) automatic masks, from Meta's ``segment-anything`` package
(``pip install "ovseg[sam]"``; docs/masks.md).

Meta's release checkpoints ``sam_vit_{h,l,b}_*.pth`` load strictly with ``torch.load(weights_only=True)``.
The settings are CorrCLIP v2's for SAM (its ``SAMGenerator``): 32x32 points, predicted-IoU and stability thresholds
0.7, the rest Meta's defaults.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from .._deps import require
from ..errors import InvalidInputError
from ..weights import check_constructor, seeded
from .amg import AutomaticMasks, load_release_weights
from .base import MaskGeneratorCfg, check_settings, register_mask_generator

__all__ = ["build_sam_masks", "SAM_SETTINGS"]

SAM_SETTINGS = dict(points_per_side=32, pred_iou_thresh=0.7, stability_score_thresh=0.7)

# encoder sizes of Meta's build_sam_vit_{h,l,b}
_ENCODERS: Dict[str, Dict[str, Any]] = {
    "vit_h": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                  encoder_global_attn_indexes=[7, 15, 23, 31]),
    "vit_l": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                  encoder_global_attn_indexes=[5, 11, 17, 23]),
    "vit_b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                  encoder_global_attn_indexes=[2, 5, 8, 11]),
}


def build_sam_masks(*, cfg: MaskGeneratorCfg, weights: Any = None, seed: int = 0,
                    model_kwargs: Optional[Dict[str, Any]] = None, **settings: Any) -> AutomaticMasks:
    """SAM of ``cfg.model`` (``vit_h``, ``vit_l``, ``vit_b``) with Meta's ``SamAutomaticMaskGenerator``.

    Args:
        weights: None (Meta's release file), a local release file, or ``"random"``.
        model_kwargs: encoder overrides (``encoder_embed_dim``, ``encoder_depth``, ``encoder_num_heads``,
            ``encoder_global_attn_indexes``), e.g. a small encoder for tests.
        **settings: ``SamAutomaticMaskGenerator`` settings overriding ``cfg.settings``.
    """
    require("segment_anything", "sam", what=f"mask generator '{cfg.name}'")
    from segment_anything import SamAutomaticMaskGenerator
    from segment_anything.build_sam import _build_sam

    amg_settings = check_settings(f"mask generator '{cfg.name}'", {**cfg.settings, **settings},
                                  SamAutomaticMaskGenerator.__init__)
    encoder = dict(_ENCODERS[cfg.model])
    unknown = sorted(set(model_kwargs or {}) - set(encoder))
    if unknown:
        raise InvalidInputError(f"mask generator '{cfg.name}': model_kwargs may set {', '.join(sorted(encoder))}; "
                                f"got {', '.join(unknown)}")
    encoder.update(model_kwargs or {})
    check_constructor(lambda: _build_sam(**encoder), model_kwargs)
    with seeded(seed):
        model = _build_sam(**encoder)  # no checkpoint: ovseg loads it below, safely and strictly
    desc = load_release_weights(model, cfg, weights)
    gen = AutomaticMasks(model.eval(), SamAutomaticMaskGenerator, amg_settings, name=cfg.name)
    gen.weights = desc
    return gen


_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
for _name, _model, _file, _desc in (
    ("sam_vit_h", "vit_h", "sam_vit_h_4b8939.pth", "SAM ViT-H"),
    ("sam_vit_l", "vit_l", "sam_vit_l_0b3195.pth", "SAM ViT-L"),
    ("sam_vit_b", "vit_b", "sam_vit_b_01ec64.pth", "SAM ViT-B"),
):
    register_mask_generator(MaskGeneratorCfg(
        _name, build_sam_masks, doc=f"{_desc} automatic masks (32x32 points, thresholds 0.7/0.7: CorrCLIP v2's)",
        model=_model, release_url=_URL + _file, settings=SAM_SETTINGS, requires=(("segment_anything", "sam"),)))
