"""Segment Anything image encoders (Kirillov et al., ICCV 2023) via timm's ``samvit_*``
(docs/methods.md, "VFM features"), and SAM's prompt encoder and mask decoder from Meta's ``segment-anything``.

The (ImageNet-normalised) crop is *stretched* to 1024x1024 (bilinear, align_corners False; not SAM's
pad-to-square) and the 256-channel neck output (B, 256, 64, 64) is the feature map, whatever the crop's shape.
Meta's release files ``sam_vit_{b,l,h}_*.pth`` load directly (the image-encoder keys are mapped with timm's
converter; :func:`build_sam_decoder` reads the prompt encoder and mask decoder from the same file).
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._deps import require
from ..errors import InvalidInputError
from ..weights import downloading, fetch_url, load_state_dict_file, parse_weights, seeded, strict_load
from .base import VFM, VFMCfg, register_vfm
from .hooks import Collect, Intermediates
from .timm_vit import create_timm_model

logger = logging.getLogger(__name__)

__all__ = ["SAMFeatures", "SAMPromptDecoder", "build_sam", "build_sam_decoder", "sam_global_block"]


def sam_global_block(blk: nn.Module, x: torch.Tensor, *, chunk: int = 1024
                     ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A timm ``samvit`` global-attention block (window size 0, decomposed relative positions) on (B, H, W, C),
    returning its output and its per-head q, k, v (B, nh, H·W, hd).

    The attention runs ``chunk`` query rows at a time (``scaled_dot_product_attention`` with the rows' relative
    position bias as its mask), so the (nh, H·W, H·W) bias that timm's block builds at once is never stored;
    otherwise the block's computation (equal to ``blk(x)`` up to float rounding).
    """
    from ..ops.trident import sam_rel_bias

    attn = blk.attn
    if blk.window_size > 0 or not attn.use_rel_pos or getattr(attn, "rope", None) is not None:
        raise InvalidInputError("sam_global_block needs a global SAM block with relative positions (no windows, "
                                "no rotary embeddings)")
    b, h, w, c = x.shape
    n = h * w
    nh = attn.num_heads
    y = blk.norm1(x).reshape(b, n, c)
    q, k, v = attn.qkv(y).view(b, n, 3, nh, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, N, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = []
    for r0 in range(0, n, chunk):
        rows = torch.arange(r0, min(r0 + chunk, n), device=x.device)
        bias = sam_rel_bias(q[:, :, rows], rel_pos_h=attn.rel_pos_h, rel_pos_w=attn.rel_pos_w, rows=rows,
                            size=(h, w))  # (B, nh, r, N)
        out.append(F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=bias, scale=attn.scale))
    o = torch.cat(out, dim=2).transpose(1, 2).reshape(b, n, c)  # (B, N, C)
    o = attn.proj(o).view(b, h, w, c)
    x = x + blk.drop_path1(blk.ls1(o))
    x = x.reshape(b, n, c)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x.reshape(b, h, w, c), (q, k, v)

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

    @property
    def num_blocks(self) -> int:
        return len(self.vit.blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        return self.vit.forward_features(x)  # (B, 256, 64, 64)

    def forward_intermediates(self, x: torch.Tensor, collect: Optional[Collect] = None) -> Intermediates:
        """The encoder and its neck, collecting what ``collect`` names (see :mod:`ovseg.backbones.hooks`).

        x: (B, 3, H, W) normalised with ``mean``/``std`` (stretched to ``input_size`` when it differs). Every global
        block runs through :func:`sam_global_block` (row-chunked attention: bounded memory, equal to timm's block
        up to float rounding). ``tokens`` are (B, h·w, C) row-major; ``qkv`` only for global blocks (SAM's windowed
        blocks have no image-wide q, k, v); attention weights are not collected (build them from q, k with
        ``ovseg.ops.trident.sam_attention``, which never needs them all at once).

        Returns:
            :class:`Intermediates` whose ``x`` is the neck output (B, 256, h, w) and ``grid`` (h, w) = (64, 64).
        """
        vit = self.vit
        collect = (collect or Collect()).resolved(self.num_blocks, owner=f"VFM '{self.name}'")
        if collect.attn:
            raise InvalidInputError(f"VFM '{self.name}' does not collect attention weights; collect qkv and use "
                                    "ovseg.ops.trident.sam_attention")
        for i in collect.qkv:
            if vit.blocks[i].window_size > 0:
                raise InvalidInputError(f"VFM '{self.name}': block {i} attends within windows; q, k, v can be "
                                        f"collected from its global blocks only")
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        from timm.layers import resample_abs_pos_embed_nhwc

        x = vit.patch_embed(x)  # (B, h, w, C)
        if vit.pos_embed is not None:
            x = x + resample_abs_pos_embed_nhwc(vit.pos_embed, x.shape[1:3])
        x = vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))
        b, h, w, c = x.shape
        out = Intermediates(x, (h, w), embed=x.reshape(b, h * w, c) if collect.embed else None)
        for i, blk in enumerate(vit.blocks):
            if blk.window_size == 0 and blk.attn.use_rel_pos and getattr(blk.attn, "rope", None) is None:
                x, qkv = sam_global_block(blk, x)
                if i in collect.qkv:
                    out.qkv[i] = qkv
            else:
                x = blk(x)
            if i in collect.tokens:
                out.tokens[i] = x.reshape(b, h * w, c)
        out.x = vit.neck(x.permute(0, 3, 1, 2))  # (B, 256, h, w)
        return out


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
    # where the weights came from, so that the prompt encoder and mask decoder load from the same source
    feats.cfg, feats.seed = cfg, seed
    feats.weights = weights if weights is None or isinstance(weights, str) else str(weights)
    return feats


class SAMPromptDecoder(nn.Module):
    """SAM's prompt encoder and mask decoder (Meta's ``segment-anything`` modules), as one module.

    Attributes:
        prompt_encoder, mask_decoder: ``segment_anything.modeling.PromptEncoder`` / ``MaskDecoder`` with the
            hyper-parameters shared by SAM ViT-B, -L and -H (256 channels, a 64x64 image embedding of a 1024 input).
    """

    def __init__(self, *, embed_dim: int = 256, grid: Tuple[int, int] = (64, 64), input_size: Tuple[int, int] = (
            1024, 1024)):
        super().__init__()
        require("segment_anything", "sam", "SAM's prompt encoder and mask decoder")
        from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

        self.prompt_encoder = PromptEncoder(embed_dim=embed_dim, image_embedding_size=tuple(grid),
                                            input_image_size=tuple(input_size), mask_in_chans=16)
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=3, transformer_dim=embed_dim, iou_head_depth=3, iou_head_hidden_dim=256,
            transformer=TwoWayTransformer(depth=2, embedding_dim=embed_dim, mlp_dim=2048, num_heads=8))

    def forward(self, features: torch.Tensor, *, point_coords: Optional[torch.Tensor] = None,
                point_labels: Optional[torch.Tensor] = None, boxes: Optional[torch.Tensor] = None,
                mask_input: Optional[torch.Tensor] = None, multimask_output: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``SamPredictor.predict_torch`` without its post-processing.

        Args:
            features: (1, 256, 64, 64) image embedding (the encoder's neck output).
            point_coords: (n, k, 2) in SAM's 1024 input frame; point_labels (n, k) (1 = foreground).
            boxes: (n, 4) x1, y1, x2, y2 in the same frame.
            mask_input: (n, 1, 256, 256) low-resolution mask logits (a 3-D (1, 256, 256) mask is passed on as
                given; SAM then embeds it unbatched and broadcasts it over the prompts).

        Returns:
            (low-resolution mask logits (n, m, 256, 256), predicted IoU (n, m)), m = 1 or 3.
        """
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return self.mask_decoder(image_embeddings=features, image_pe=self.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=multimask_output)


_DECODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")


def build_sam_decoder(vfm: nn.Module) -> SAMPromptDecoder:
    """SAM's prompt encoder and mask decoder with the weights of the same source as the SAM VFM ``vfm``.

    ``vfm_weights`` None: Meta's release file (``sam_vit_b_01ec64.pth`` ...) from the torch hub cache or one
    download (timm's encoder-only file has no decoder); a local path: that file, which must be Meta's full
    release (``prompt_encoder.*`` and ``mask_decoder.*`` keys, read with ``weights_only=True``); ``"random"``:
    seeded random weights (the VFM's seed). On the VFM's device and dtype, in eval mode.
    """
    cfg = getattr(vfm, "cfg", None)
    if cfg is None or not hasattr(vfm, "weights"):
        raise InvalidInputError(f"{type(vfm).__name__} is not a SAM VFM built by ovseg (sam_b16, sam_l16, sam_h16); "
                                "its prompt encoder and mask decoder cannot be located")
    name = cfg.name
    grid = tuple(vfm.grid_size(*vfm.input_size))
    src = parse_weights(vfm.weights, option="vfm_weights", what=f"VFM '{name}'")
    with seeded(vfm.seed if src.kind == "random" else 0):
        decoder = SAMPromptDecoder(embed_dim=int(vfm.embed_dim), grid=grid, input_size=tuple(vfm.input_size))
    if src.kind != "random":
        if src.kind == "path":
            path = str(src.path)
        else:
            load = (f'Segmenter(..., vfm_weights={{"sam": PATH}}) with PATH = the downloaded {cfg.release_file}')
            with downloading(f"SAM's prompt encoder and mask decoder ('{name}')",
                             fetch=f"{cfg.release_file} from {cfg.release_url}", load=load):
                path = fetch_url(cfg.release_url)
        sd = load_state_dict_file(path, option="vfm_weights")
        parts = {k: v for k, v in sd.items() if k.startswith(_DECODER_PREFIXES)}
        if not parts:
            raise InvalidInputError(
                f"vfm_weights '{path}' holds no prompt encoder or mask decoder (keys 'prompt_encoder.*', "
                f"'mask_decoder.*'); SAM's refinement needs Meta's full release file ({cfg.release_file}), or "
                "switch the refinement off")
        strict_load(decoder, parts, option="vfm_weights", value=path, target=f"SAM's prompt encoder and mask "
                    f"decoder ('{name}')", expected=f"Meta's {cfg.release_file}")
        logger.info("loaded SAM's prompt encoder and mask decoder from %s", path)
    p = next(vfm.parameters())
    return decoder.to(device=p.device, dtype=p.dtype).eval().requires_grad_(False)


for _name, _timm, _desc in (
    ("sam_b16", "samvit_base_patch16.sa1b", "SAM ViT-B"),
    ("sam_l16", "samvit_large_patch16.sa1b", "SAM ViT-L"),
    ("sam_h16", "samvit_huge_patch16.sa1b", "SAM ViT-H"),
):
    register_vfm(VFMCfg(_name, build_sam, doc=f"{_desc} image encoder: 256-channel neck output at 64x64",
                        timm_name=_timm, convert=convert_sam))
