"""ResCLIP (Yang et al., CVPR 2025) as a plug-in on a base method's last block: residual cross-correlation
self-attention (RCS) from intermediate attention maps, and semantic feedback refinement (SFR), a second pass
whose attention logits are biased by the first pass's segmentation of the window (docs/methods.md, "ResCLIP").

``Segmenter("resclip")`` uses the paper's default base (NACLIP); ``Segmenter("resclip", base="sclip")`` (or the
presets ``resclip_sclip``, ``resclip_clearclip``) the others. The maths lives in :mod:`ovseg.ops.resclip`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import torch

from ..backbones.hooks import Collect
from ..errors import InvalidInputError
from ..ops import resclip as ops
from ..params import (
    Param,
    boolean,
    layer_range,
    non_negative_int,
    one_of,
    optional,
    positive,
    positive_int,
    unit_interval,
)
from .base import DenseStrategy, WindowContext, register_strategy

__all__ = ["ResCLIP", "rcs_blocks"]

_PRESET_OF_BASE = {"vanilla": "clip"}
_RCS_12 = (6, 9)  # 1-indexed blocks whose attention maps RCS averages; the official code uses them for every depth


def rcs_blocks(depth: int, layers: Optional[Tuple[int, int]] = None) -> Tuple[int, ...]:
    """0-indexed blocks whose attention RCS averages, for a CLIP of ``depth`` blocks.

    ``layers`` = (first, last) 1-indexed, inclusive; ``None``: (6, 9) as the official code for any CLIP of 10 or
    more blocks (also ViT-L/14), scaled by ``depth / 12`` (rounded half up) for shallower ones.
    """
    if layers is None:
        if depth >= 10:
            layers = _RCS_12
        else:
            layers = tuple(min(max(int(i * depth / 12 + 0.5), 1), depth - 1) for i in _RCS_12)
    first, last = layers
    if not 1 <= first <= last <= depth - 1:
        raise InvalidInputError(f"rcs_layers {tuple(layers)} must be 1-indexed blocks within 1..{depth - 1} of a "
                                f"{depth}-block CLIP (the last block belongs to ResCLIP)")
    return tuple(range(first - 1, last))


def _mix(name: str, value: Any) -> Tuple[float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise InvalidInputError(f"{name} must be a (tau, lambda) pair, got {value!r}")
    return positive(name, value[0]), unit_interval(name, value[1])


def _dilations(name: str, value: Any) -> Tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or not tuple(value):
        raise InvalidInputError(f"{name} must be a non-empty sequence of positive ints, got {value!r}")
    return tuple(positive_int(name, v) for v in value)


@register_strategy
class ResCLIP(DenseStrategy):
    """ResCLIP's two passes through CLIP's last block (:func:`ovseg.ops.resclip.resclip_tokens`)."""

    name = "resclip"
    doc = "ResCLIP (CVPR 2025): RCS + semantic feedback on a naclip, clearclip, sclip or vanilla last block"
    needs_text = True  # the first pass segments the window with the labels
    params = (
        Param("base", "naclip", "base method of the last block: naclip, clearclip, sclip or vanilla",
              one_of(*sorted(ops.BASES))),
        Param("rcs", True, "mix the intermediate attention maps (RCS) into the last block's attention", boolean),
        Param("sfr", True, "second pass with the semantic feedback (SFR) of the first pass's labels", boolean),
        Param("rcs_mix", (2.0, 0.3), "RCS (tau, lambda): W = tau((1-lambda) W + lambda A_c)", _mix),
        Param("sfr_mix", (1.8, 0.7), "SFR (tau, lambda) on the second pass's logits", _mix),
        Param("temp_thd", 0.3, "first-pass pixels less confident than this take query 0", unit_interval),
        Param("rcs_layers", None, "(first, last) 1-indexed blocks averaged by RCS (None: (6, 9))",
              optional(layer_range)),
        Param("sigma", 5.0, "std (patches) of NACLIP's Gaussian window and of the SFR blur", positive),
        Param("residual", None, "keep the last block's residual and FFN (None: per base; sclip/vanilla keep them)",
              optional(boolean)),
        Param("feedback_logit_scale", 40.0, "softmax temperature of the first pass", positive),
        Param("feedback_pamr_steps", 10, "PAMR iterations on the first pass (0 = off)", non_negative_int),
        Param("feedback_pamr_dilations", (8, 16), "PAMR dilations of the first pass", _dilations),
        Param("delete_same_entity", True, "decay same-label pairs whose straight path leaves the label", boolean),
        Param("sfr_fp16", True, "round the normalised SFR matrix through float16 as the official code", boolean),
    )

    @classmethod
    def check(cls, options: Mapping[str, Any], **kwargs: Any):
        out = super().check(options, **kwargs)
        if not out["rcs"] and not out["sfr"]:
            plain = _PRESET_OF_BASE.get(out["base"], out["base"])
            raise InvalidInputError("rcs=False and sfr=False is the plain base method: use "
                                    f"Segmenter('{plain}') instead, or keep one of the terms")
        return out

    def window_elements(self, model, height: int, width: int) -> int:
        """Kept RCS maps (nh, T, T), the two passes' weights, the SFR matrices and the path-check chunks."""
        clip = model.clip
        gh, gw = clip.grid_size(height, width)
        t = gh * gw + 1
        maps = len(rcs_blocks(clip.num_blocks, self.options["rcs_layers"])) if self.options["rcs"] else 0
        return (maps + 2) * clip.num_heads * t * t + 6 * t * t + 64 * t * (max(gh, gw) + 1)

    def forward(self, model, crops: torch.Tensor, context: WindowContext) -> torch.Tensor:
        clip = model.clip
        o = self.options
        blocks = rcs_blocks(clip.num_blocks, o["rcs_layers"])
        need_maps = o["rcs"]
        out = clip.forward_intermediates(crops, Collect(attn=blocks if need_maps else ()))
        maps = [out.attn[i] for i in blocks] if need_maps else []  # (B, nh, T, T) each
        tokens = ops.resclip_tokens(
            out.x, maps, clip.block(-1), clip.project, context.text, crops, patch_size=tuple(clip.patch_size),
            base=o["base"], temp_thd=o["temp_thd"], rcs_mix=o["rcs_mix"] if o["rcs"] else None,
            sfr_mix=o["sfr_mix"] if o["sfr"] else None,
            residual=o["residual"], sigma=o["sigma"], logit_scale=o["feedback_logit_scale"],
            pamr_steps=o["feedback_pamr_steps"], pamr_dilations=o["feedback_pamr_dilations"],
            delete_same_entity=o["delete_same_entity"], fp16_round=o["sfr_fp16"])  # (B, T, D)
        return clip.to_map(clip.project(tokens), out.grid, has_cls=True)  # (B, E, gh, gw)
