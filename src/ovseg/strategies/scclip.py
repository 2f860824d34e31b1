"""SC-CLIP (Bai et al., IEEE TIP 2025): CLIP's last block replaced by anomaly repair, similarity-guided
re-aggregation and multi-level fusion, computed from one trunk forward (docs/methods.md, "SC-CLIP").

The maths lives in :mod:`ovseg.ops.scclip` (pure tensor functions checked against the official code); this module
declares the options, picks the blocks for the CLIP's depth and wires the functions to the backbone.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch

from ..backbones.hooks import Collect
from ..errors import InvalidInputError
from ..ops import scclip as ops
from ..params import Param, boolean, layer_range, non_negative, optional, positive, positive_int
from .base import DenseStrategy, WindowContext, register_strategy

__all__ = ["SCCLIP", "scclip_blocks"]

# The official settings (1-indexed blocks): ViT-B/16 (12 blocks) from the code's defaults, ViT-L/14 (24 blocks)
# from the repository's first commit. Other depths scale the 12-block indices (see scclip_blocks).
_OFFICIAL: Dict[int, Dict[str, Any]] = {
    12: dict(pre_layer=9, post_layer=4, fusion_layers=(4, 10), res_cls=0.3),
    24: dict(pre_layer=17, post_layer=7, fusion_layers=(9, 19), res_cls=0.1),
}


def _scaled(i: int, depth: int) -> int:
    """A 1-indexed block of the 12-block setting moved to ``depth`` blocks: rounded half up, within 1..depth−1."""
    return min(max(int(i * depth / 12 + 0.5), 1), depth - 1)


def scclip_blocks(depth: int, options: Mapping[str, Any]) -> Dict[str, Any]:
    """The layer settings for a CLIP of ``depth`` blocks: explicit options win, ``None`` takes the official value
    for 12 and 24 blocks and the 12-block value scaled by ``depth / 12`` otherwise.

    Returns:
        ``{"pre_layer", "post_layer", "fusion_layers", "res_cls"}`` (1-indexed blocks, inclusive range).
    """
    if depth < 3:
        raise InvalidInputError(f"SC-CLIP needs a CLIP with at least 3 blocks, got {depth}")
    base = _OFFICIAL.get(depth)
    if base is None:
        b12 = _OFFICIAL[12]
        base = dict(pre_layer=_scaled(b12["pre_layer"], depth), post_layer=_scaled(b12["post_layer"], depth),
                    fusion_layers=tuple(_scaled(i, depth) for i in b12["fusion_layers"]), res_cls=b12["res_cls"])
    out = {k: (base[k] if options.get(k) is None else options[k]) for k in base}
    ops.scclip_layers(depth, pre_layer=out["pre_layer"], post_layer=out["post_layer"],
                      fusion_layers=out["fusion_layers"])  # raises naming blocks the CLIP does not have
    return out


def _fraction(name: str, value: Any) -> float:
    v = positive(name, value)
    if v >= 1:
        raise InvalidInputError(f"{name} must be in (0, 1), got {value!r}")
    return v


@register_strategy
class SCCLIP(DenseStrategy):
    """SC-CLIP's last layer from the outputs of CLIP's earlier blocks (:func:`ovseg.ops.scclip.scclip_tokens`)."""

    name = "scclip"
    doc = "SC-CLIP (TIP 2025): LOF anomaly repair, similarity-guided last block, multi-level fusion"
    params = (
        Param("pre_layer", None, "1-indexed block whose repaired similarity guides the last block "
              "(None: 9 for 12-block CLIPs, 17 for 24)", optional(positive_int)),
        Param("post_layer", None, "1-indexed block whose similarity re-aggregates the outputs "
              "(None: 4 for 12 blocks, 7 for 24)", optional(positive_int)),
        Param("fusion_layers", None, "(first, last) 1-indexed blocks summed for the fusion branch "
              "(None: (4, 10) for 12 blocks, (9, 19) for 24)", optional(layer_range)),
        Param("res_cls", None, "weight of the CLS token added to every output token "
              "(None: 0.3, 0.1 for 24 blocks)", optional(non_negative)),
        Param("beta", 0.4, "similarity cut of the re-aggregation weights", non_negative),
        Param("n_neighbors", 30, "k of the local outlier factor", positive_int),
        Param("contamination", 0.05, "share of tokens treated as anomalies", _fraction),
        Param("guide_scale", 3.0, "scale of the centred similarity that guides the attention", positive),
        Param("reference_positions", False, "repair anomalies where the official code does on non-square grids "
              "(row // gh, row % gh); False repairs them where they are", boolean),
    )

    def blocks(self, depth: int) -> Dict[str, Any]:
        """The resolved layer settings for a CLIP of ``depth`` blocks (see :func:`scclip_blocks`)."""
        return scclip_blocks(depth, self.options)

    def window_elements(self, model, height: int, width: int) -> int:
        """Kept block outputs (B, T, D) and the (N, N) matrices: distances, similarities, weights, per-head guide."""
        clip = model.clip
        gh, gw = clip.grid_size(height, width)
        n = gh * gw
        b = self.blocks(clip.num_blocks)
        kept = len(ops.scclip_layers(clip.num_blocks, pre_layer=b["pre_layer"], post_layer=b["post_layer"],
                                     fusion_layers=b["fusion_layers"]))
        return kept * (n + 1) * clip.width + (6 + 2 * clip.num_heads) * n * n

    def forward(self, model, crops: torch.Tensor, context: Optional[WindowContext] = None) -> torch.Tensor:
        clip = model.clip
        depth = clip.num_blocks
        blocks = self.blocks(depth)
        layers = ops.scclip_layers(depth, pre_layer=blocks["pre_layer"], post_layer=blocks["post_layer"],
                                   fusion_layers=blocks["fusion_layers"])
        last = depth - 1  # the last block's input = output of block L−1 (1-indexed) = out.x
        out = clip.forward_intermediates(crops, Collect(tokens=tuple(i - 1 for i in layers if i != last)))
        outputs = {i: out.tokens[i - 1] for i in layers if i != last}  # 1-indexed -> (B, 1+N, D)
        outputs[last] = out.x
        o = self.options
        tokens = ops.scclip_tokens(
            outputs, out.grid, clip.block(-1), num_layers=depth, res_cls=blocks["res_cls"],
            pre_layer=blocks["pre_layer"], post_layer=blocks["post_layer"], fusion_layers=blocks["fusion_layers"],
            beta=o["beta"], n_neighbors=o["n_neighbors"], contamination=o["contamination"],
            guide_scale=o["guide_scale"], reference_positions=o["reference_positions"])  # (B, N, D)
        return clip.to_map(clip.project(tokens), out.grid, has_cls=False)  # (B, E, gh, gw)
