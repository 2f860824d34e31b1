"""SAM 2 (Ravi et al., 2024) automatic masks, from Meta's ``sam2`` package (docs/masks.md).

Install: ``SAM2_BUILD_CUDA=0 pip install --no-build-isolation "ovseg[sam2]"`` (the package is a source
distribution that compiles an optional CUDA extension used only by post-processing ovseg does not enable; without
``--no-build-isolation`` pip downloads a second torch to build it).

``sam2_hiera_l`` is what CorrCLIP v1 generates masks with ("SAM2₈" in its README): SAM **2.0** Hiera-L
(``sam2_hiera_large.pt``), built with ``apply_postprocessing=False`` (no dynamic fall-back to multi-mask outputs),
``SAM2AutomaticMaskGenerator(points_per_side=8, pred_iou_thresh=0.4, stability_score_thresh=0.4,
multimask_output=False)``, the rest Meta's defaults. The other sizes and SAM 2.1 use the same settings.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Dict, List, Optional

from ..errors import InvalidInputError, MissingDependencyError
from ..weights import seeded
from .amg import AutomaticMasks, load_release_weights
from .base import MaskGeneratorCfg, check_settings, register_mask_generator

__all__ = ["build_sam2_masks", "SAM2_SETTINGS", "SAM2_INSTALL"]

SAM2_SETTINGS = dict(points_per_side=8, pred_iou_thresh=0.4, stability_score_thresh=0.4, multimask_output=False)
SAM2_INSTALL = 'SAM2_BUILD_CUDA=0 pip install --no-build-isolation "ovseg[sam2]"'


def _require_sam2(name: str) -> None:
    if importlib.util.find_spec("sam2") is None or importlib.util.find_spec("hydra") is None:
        raise MissingDependencyError(
            f"mask generator '{name}' needs Meta's optional package 'sam2', which is not installed. Install it "
            f"with: {SAM2_INSTALL} -- or pass masks yourself (predict(..., masks=...)) with mask_generator='none'")


def _hydra_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if value is None:
        return "null"
    return str(value)


def hydra_overrides(model_kwargs: Optional[Dict[str, Any]]) -> List[str]:
    """``{"image_encoder.trunk.embed_dim": 16}`` -> ``["++model.image_encoder.trunk.embed_dim=16"]``."""
    out = []
    for key, value in (model_kwargs or {}).items():
        if not isinstance(key, str) or not key or any(c in key for c in "=+ "):
            raise InvalidInputError(f"SAM 2 model_kwargs keys are dotted config paths under 'model', got {key!r}")
        out.append(f"++model.{key}={_hydra_value(value)}")
    return out


def build_sam2_masks(*, cfg: MaskGeneratorCfg, weights: Any = None, seed: int = 0,
                     model_kwargs: Optional[Dict[str, Any]] = None, **settings: Any) -> AutomaticMasks:
    """SAM 2 of ``cfg.model`` (a hydra config of the ``sam2`` package) with Meta's ``SAM2AutomaticMaskGenerator``.

    Args:
        weights: None (Meta's release file), a local release file (``{"model": state_dict}``), or ``"random"``.
        model_kwargs: config overrides as dotted paths under ``model`` (e.g. ``{"image_encoder.trunk.embed_dim":
            16}``), for small test configs.
        **settings: ``SAM2AutomaticMaskGenerator`` settings overriding ``cfg.settings``.
    """
    _require_sam2(cfg.name)
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from sam2.build_sam import build_sam2

    amg_settings = check_settings(f"mask generator '{cfg.name}'", {**cfg.settings, **settings},
                                  SAM2AutomaticMaskGenerator.__init__)
    with seeded(seed):
        # no checkpoint here: ovseg loads it below with weights_only=True and a strict key check
        model = build_sam2(cfg.model, None, device="cpu", apply_postprocessing=False,
                           hydra_overrides_extra=hydra_overrides(model_kwargs))
    desc = load_release_weights(model, cfg, weights)
    gen = AutomaticMasks(model.eval(), SAM2AutomaticMaskGenerator, amg_settings, name=cfg.name)
    gen.weights = desc
    return gen


_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/"
for _version, _date, _label in (("sam2", "072824", "2.0"), ("sam2.1", "092824", "2.1")):
    for _size, _file in (("t", "tiny"), ("s", "small"), ("b+", "base_plus"), ("l", "large")):
        _name = f"{_version}_hiera_{_size}"
        _note = " (CorrCLIP v1's generator)" if _name == "sam2_hiera_l" else ""
        register_mask_generator(MaskGeneratorCfg(
            _name, build_sam2_masks, doc=f"SAM {_label} Hiera-{_size.upper()} automatic masks, "
                                         f"8x8 points, thresholds 0.4/0.4, one mask per point{_note}",
            model=f"configs/{_version}/{_name}.yaml", release_url=f"{_URL}{_date}/{_version}_hiera_{_file}.pt",
            settings=SAM2_SETTINGS))
