"""Meta's automatic mask generation around a SAM or SAM 2 model, as a :class:`MaskGenerator` (docs/masks.md).

The generator lays a grid of point prompts over the image, keeps the masks whose predicted IoU and stability pass
the thresholds, removes duplicates with box NMS, and returns binary masks at the image's size; ovseg paints them
into a region map by ascending area, as CorrCLIP does.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn

from ..errors import InvalidInputError, InvalidTypeError
from ..weights import downloading, fetch_url, load_state_dict_file, parse_weights, strict_load
from .base import MaskGenerator, MaskGeneratorCfg
from .inputs import paint_by_area

logger = logging.getLogger(__name__)

__all__ = ["AutomaticMasks", "load_release_weights", "mask_load_call"]


class AutomaticMasks(MaskGenerator):
    """A SAM-family model and Meta's automatic mask generator over it.

    Args:
        model: the SAM (``segment_anything.modeling.Sam``) or SAM 2 (``sam2.modeling.sam2_base.SAM2Base``) model.
        amg_cls: Meta's ``SamAutomaticMaskGenerator`` or ``SAM2AutomaticMaskGenerator``.
        settings: its keyword settings (points per side, thresholds, ...).
        name: the registered name.
    """

    def __init__(self, model: nn.Module, amg_cls: Callable[..., Any], settings: Mapping[str, Any], *,
                 name: str = "amg"):
        super().__init__()
        self.model = model
        self.name = name
        self.settings = dict(settings)
        # Meta's generator holds a predictor that refers to self.model (moved in place by .to())
        self.amg = amg_cls(model, **self.settings)

    def generate(self, image: np.ndarray) -> torch.Tensor:
        """uint8 RGB (H, W, 3) -> (H, W) int64 region map (0 = no mask), masks painted by ascending area."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InvalidTypeError(f"{self.name}: expected a uint8 (H, W, 3) RGB array, got "
                                   f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
        anns = self.amg.generate(np.ascontiguousarray(image))
        logger.debug("%s: %d masks", self.name, len(anns))
        return paint_by_area([a["segmentation"] for a in anns], image.shape[:2], [a["area"] for a in anns])


def mask_load_call(name: str, path: str = "PATH") -> str:
    """The exact Python call and CLI flags that load a local release checkpoint of mask generator ``name``."""
    return (f'Segmenter("corrclip", mask_generator="{name}", mask_weights={path}) '
            f"(CLI: --mask-generator {name} --mask-weights {path})")


def load_release_weights(model: nn.Module, cfg: MaskGeneratorCfg, weights: Any,
                         convert: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None
                         ) -> str:
    """Load ``weights`` (None: the release file from the cache or one download; a local file) into ``model``,
    strictly, without unpickling code. Returns a short description of the weights."""
    src = parse_weights(weights, option="mask_weights", what=f"mask generator '{cfg.name}'")
    if src.kind == "random":
        return "random"
    if src.kind == "default":
        if not cfg.release_url:
            raise InvalidInputError(f"mask generator '{cfg.name}' has no release checkpoint; pass mask_weights=PATH")
        with downloading(f"mask generator '{cfg.name}'", fetch=f"{cfg.release_file} from {cfg.release_url}",
                         load=mask_load_call(cfg.name)):
            path = fetch_url(cfg.release_url)
    else:
        if src.path.is_dir():
            raise InvalidInputError(f"mask_weights: '{weights}' is a folder; pass the release file "
                                    f"({cfg.release_file})")
        path = str(src.path)
    sd = load_state_dict_file(path, option="mask_weights")  # Meta's {"model": state_dict} is unwrapped
    if convert is not None:
        sd = convert(sd)
    strict_load(model, sd, option="mask_weights", value=weights if weights is not None else path,
                target=f"mask generator '{cfg.name}'", expected=f"Meta's {cfg.release_file}")
    logger.info("loaded mask generator %s from %s", cfg.name, path)
    return str(path)
