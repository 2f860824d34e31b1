"""CorrCLIP (Zhang et al., ICCV 2025, "Reconstructing Patch Correlations in CLIP for Open-Vocabulary Semantic
Segmentation") as a dense strategy (docs/methods.md, "CorrCLIP"), built from :mod:`ovseg.ops.corrclip`.

Per image: a region map (the user's masks, or a registered mask generator on the full image, :mod:`ovseg.masks`),
cut into windows with the image (padding = its own region). Per window: DINO's last-block ``q + k`` similarity,
restricted to same-region pairs (regions with close mean features merged) or, for unsegmented tokens, to pairs above
the window's mean similarity, at temperature 4 (scope and value reconstruction); CLIP's last-block values of the
last block's input (main branch) and of the mean of intermediate block outputs (spatial branch) mixed by it; one
class token per region through every CLIP block, attending only to its region (semantic branch); the three fused
after ``ln_post`` and projected. Per image again: a majority vote of the label map inside each region.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from ..backbones.hooks import Collect
from ..errors import InvalidInputError, InvalidTypeError
from ..masks import MaskGenerator, as_region_map, create_mask_generator, list_mask_generators
from ..masks.base import MASK_GENERATORS
from ..ops import corrclip as cc
from ..params import Param, boolean, int_tuple, non_negative, number, optional, positive, positive_int
from .base import DenseStrategy, ImageContext, WindowContext, register_strategy

logger = logging.getLogger(__name__)

__all__ = ["CorrCLIP"]

NO_GENERATOR = "none"


def _mask_generator(name: str, value: Any) -> str:
    if value == NO_GENERATOR:
        return value
    if not isinstance(value, str):
        raise InvalidTypeError(f"{name} must be a mask generator name or 'none', got {type(value).__name__} "
                               f"{value!r}")
    MASK_GENERATORS.get(value)  # unknown names raise with a did-you-mean suggestion
    return value


def _weights(name: str, value: Any) -> Any:
    import os

    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise InvalidTypeError(f"{name} must be None (the release checkpoint), 'random' or a path, got {value!r}")
    return value


def _mapping(name: str, value: Any) -> Dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidTypeError(f"{name} must be a mapping of mask-generator options, got {value!r}")
    return dict(value)


def _max_side(name: str, value: Any) -> Optional[int]:
    if value is None or (not isinstance(value, bool) and value == 0):
        return None
    return positive_int(name, value)


_GENERATOR_KEYS = ("mask_generator", "mask_weights", "mask_kwargs")


@register_strategy
class CorrCLIP(DenseStrategy):
    """CorrCLIP's window computation, per-image region maps and region vote (official v1 code's defaults)."""

    name = "corrclip"
    doc = "CorrCLIP (ICCV 2025): region-scoped DINO correlations, spatial and semantic branches, region vote"
    uses_masks = True
    params = (
        Param("mask_generator", "sam2_hiera_l", "region masks when predict() gets none: a name from "
              "ovseg.masks.list_mask_generators(), or 'none' (masks must be given)", _mask_generator),
        Param("mask_weights", None, "mask generator checkpoint: None (Meta's release file), a path, or 'random'",
              _weights),
        Param("mask_kwargs", {}, "mask generator options: settings (points_per_side, pred_iou_thresh, ...) and "
              "model_kwargs", _mapping),
        Param("mask_max_side", 2048, "images whose long side exceeds this are downscaled for the mask generator "
              "(its masks are scaled back); 0 = never", _max_side),
        Param("tau", 4.0, "temperature of the region-scoped similarity softmax", positive),
        Param("eps", 0.2, "merge regions whose mean-feature distance is at most this (DBSCAN eps)", non_negative),
        Param("merge", True, "merge regions with close mean VFM features", boolean),
        Param("alpha", 1.0, "weight of the spatial branch", number),
        Param("beta", 0.5, "weight of the semantic branch (region class tokens)", number),
        Param("keep_diagonal", True, "always let a token attend to itself (False: the official NaN rows in "
              "uniform windows)", boolean),
        Param("spatial_blocks", None, "blocks (0-based) averaged by the spatial branch; None = the official rule",
              optional(int_tuple)),
        Param("vote", True, "majority vote of the labels inside each region", boolean),
    )

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.mask_generator: Optional[MaskGenerator] = self._build_generator(self.options)

    # ------------------------------------------------------------------ declaration
    @classmethod
    def vfm_roles(cls, options: Mapping[str, Any]) -> Dict[str, Optional[str]]:
        return {"vfm": "dino_b8"}

    @staticmethod
    def _build_generator(options: Mapping[str, Any]) -> Optional[MaskGenerator]:
        name = options["mask_generator"]
        if name == NO_GENERATOR:
            return None
        return create_mask_generator(name, options["mask_weights"], **options["mask_kwargs"])

    def set_options(self, options: Mapping[str, Any]) -> None:
        """Validate, rebuild the mask generator if its options changed (before committing anything), commit."""
        checked = self.check(options)
        generator = self.mask_generator
        if any(checked[k] != self.options[k] for k in _GENERATOR_KEYS):
            generator = self._build_generator(checked)
        self.mask_generator = generator
        self.options = checked

    def spatial_blocks(self, num_blocks: int) -> Tuple[int, ...]:
        """The blocks whose outputs the spatial branch averages (0-based, all before the last block)."""
        blocks = self.options["spatial_blocks"]
        if blocks is None:
            return tuple(cc.spatial_block_indices(num_blocks))
        out = tuple(sorted({b + num_blocks if b < 0 else b for b in blocks}))
        if not all(0 <= b < num_blocks - 1 for b in out):
            raise InvalidInputError(f"spatial_blocks must lie in 0..{num_blocks - 2} for a {num_blocks}-block CLIP, "
                                    f"got {blocks}")
        return out

    def window_elements(self, model, height: int, width: int) -> int:
        # q, k, v of every CLIP block before the last are kept for the region class tokens
        gh, gw = model.clip.grid_size(height, width)
        return 3 * (model.clip.num_blocks - 1) * (gh * gw + 1) * model.clip.width

    # ------------------------------------------------------------------ region maps
    def _generator(self, device: torch.device, what: str) -> MaskGenerator:
        gen = self.mask_generator
        if gen is None:
            raise InvalidInputError(
                f"CorrCLIP needs region masks for {what}: pass masks= to predict (a label image or boolean masks), "
                f"or choose a mask generator (mask_generator=..., one of {', '.join(list_mask_generators())})")
        params = list(gen.parameters()) if isinstance(gen, torch.nn.Module) else []
        if params and params[0].device != device:
            gen.to(device)
        return gen

    def generate_regions(self, rgb: np.ndarray, device: Optional[torch.device] = None) -> torch.Tensor:
        """The mask generator on a uint8 (H, W, 3) image -> (H, W) int64 region map at the image's size.

        Images whose long side exceeds ``mask_max_side`` are downscaled (PIL bilinear) for the generator and its
        map is scaled back with nearest sampling, which bounds the generator's memory (it keeps a float mask per
        point prompt at the input's size).
        """
        gen = self._generator(torch.device("cpu") if device is None else device, "this image")
        h0, w0 = rgb.shape[:2]
        cap = self.options["mask_max_side"]
        if cap is not None and max(h0, w0) > cap:
            from PIL import Image

            s = cap / max(h0, w0)
            size = (max(1, int(h0 * s + 0.5)), max(1, int(w0 * s + 0.5)))
            small = np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))
            regions = torch.as_tensor(gen.generate(small)).long().cpu()
            return cc.resize_region_map(regions[None], (h0, w0))[0]
        return as_region_map(gen.generate(rgb), (h0, w0))

    def prepare(self, model, image: ImageContext, text: Optional[torch.Tensor]) -> None:
        """The image's region map: the user's masks, else the mask generator's on the full-resolution image."""
        if image.masks is not None:
            regions = as_region_map(image.masks, image.size)
        elif image.rgb is not None:
            regions = self.generate_regions(image.rgb, image.x.device)
        else:
            raise InvalidInputError("CorrCLIP needs the image's RGB pixels or its masks (ImageContext.rgb/.masks)")
        image.extra["regions"] = regions.to(device=image.x.device, dtype=torch.int32)

    def aux_maps(self, image: ImageContext) -> Dict[str, Tuple[torch.Tensor, float]]:
        """The region map at the resized image's size (nearest), cut into windows with it; padding = region 10000."""
        regions = image.extra["regions"].long()
        resized = cc.resize_region_map(regions[None], tuple(image.x.shape[-2:]))  # (1, H, W)
        return {"regions": (resized, cc.PAD_REGION)}

    def _window_regions(self, model, crops: torch.Tensor) -> torch.Tensor:
        """Region maps of windows that came without one (a direct ``model(crops)`` call): the generator per window."""
        gen = self._generator(crops.device, "windows given without region maps")
        rgb = (crops.float() * model.clip_std + model.clip_mean).mul(255).round().clamp(0, 255).byte()
        rgb = rgb.permute(0, 2, 3, 1).cpu().numpy()  # (N, h, w, 3)
        return torch.stack([as_region_map(gen.generate(np.ascontiguousarray(r)), r.shape[:2]) for r in rgb]
                           ).to(crops.device)

    # ------------------------------------------------------------------ windows
    def forward(self, model, crops: torch.Tensor, context: WindowContext) -> torch.Tensor:
        clip = model.clip
        if not hasattr(clip, "block") or not hasattr(clip, "visual"):
            raise InvalidInputError("CorrCLIP runs its region tokens through open_clip's blocks; it needs an "
                                    f"open_clip CLIP, not {type(clip).__name__}")
        regions = context.aux.get("regions") if context is not None else None
        regions = self._window_regions(model, crops) if regions is None else regions[:, 0].long()  # (N, h, w)
        n = crops.shape[0]

        # scope and value reconstruction from the VFM's last-block q + k (one VFM forward)
        vout = model.vfm_intermediates(crops, Collect(qkv=(-1,)))
        q, k, _ = next(iter(vout.qkv.values()))  # (N, nh, prefix + M, hd)
        prefix = int(getattr(model.vfm, "num_prefix", 1))
        if prefix > 1:  # keep one prefix token, which vfm_qk_features drops
            q, k = q[:, :, prefix - 1:], k[:, :, prefix - 1:]
        feats = cc.vfm_qk_features(q, k)  # (N, M, C), unit norm
        size = tuple(vout.grid)  # (I, J)
        del vout
        region_vfm = cc.resize_region_map(regions, size)  # (N, I, J)
        if self.options["merge"]:
            region_vfm = cc.merge_regions(region_vfm, feats, eps=self.options["eps"])
        attn = cc.scope_attention(feats, region_vfm, temperature=self.options["tau"],
                                  keep_diagonal=self.options["keep_diagonal"])  # (N, M, M)

        # one CLIP trunk pass: the last block's input, the spatial blocks' outputs, every block's k and v
        nb = clip.num_blocks
        spatial = self.spatial_blocks(nb)
        out = clip.forward_intermediates(crops, Collect(tokens=spatial, qkv=tuple(range(nb - 1)), embed=True))
        grid = tuple(out.grid)
        last = clip.block(nb - 1)
        _, k_last, v_last = clip.qkv(nb - 1, last.ln_1(out.x), "kv")
        kv = [out.qkv[i][1:] for i in range(nb - 1)] + [(k_last, v_last)]
        main = cc.correlation_branch(attn, out.x, grid=grid, size=size, block=last)  # (N, M, D)
        spatial_x = cc.mean_block_outputs([out.tokens[i] for i in spatial])
        spat = cc.correlation_branch(attn, spatial_x, grid=grid, size=size, block=last)
        del attn, spatial_x

        # semantic branch: one class token per region of the CLIP grid, through every block
        allow, _, index = cc.region_token_allow(cc.resize_region_map(region_vfm, grid))
        tokens = cc.region_tokens(out.embed[:, 0], kv, [clip.block(i) for i in range(nb)], allow)
        sem = cc.scatter_region_tokens(tokens, index, size)  # (N, M, D)
        fused = cc.fuse_branches(main, spat, sem, ln_post=clip.visual.ln_post, proj=clip.visual.proj,
                                 alpha=self.options["alpha"], beta=self.options["beta"])  # (N, M, E)
        return fused.transpose(1, 2).reshape(n, fused.shape[-1], size[0], size[1])

    # ------------------------------------------------------------------ full resolution
    def postprocess(self, model, label_map: torch.Tensor, image: ImageContext, scores_at: Any = None
                    ) -> torch.Tensor:
        """Every region of the original-size map (all but its smallest id) takes its most frequent label."""
        if not self.options["vote"]:
            return label_map
        regions = image.extra["regions"].to(label_map.device)
        return cc.region_vote(label_map, regions, band_pixels=1 << 21)
