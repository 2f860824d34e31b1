"""Trident (Shi, Dong & Xu, ICCV 2025): splice-then-segment with CLIP, DINO and SAM (docs/methods.md, "Trident").

Run in whole-image mode (``window=None``): each image is up-scaled so its sides are multiples of the CLIP patch
and cut into 336-pixel sub-images; CLIP's last block mixes its values with ProxyCLIP's proxy attention from DINO
(one similarity mean per image), the sub-image outputs are spliced into one map, and SAM's last global attention
block, run once on the *original* image, gives a correlation matrix that aggregates the spliced map on SAM's grid.
The logits on SAM's grid go straight to the input's size (``native_grid``). The coarse label map is optionally
refined by prompting SAM's mask decoder with points, boxes and masks of its connected regions (``postprocess``).
The tensor operations are :mod:`ovseg.ops.trident`.
"""
from __future__ import annotations

from typing import Any, Dict, Hashable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones.hooks import Collect
from ..errors import InvalidInputError
from ..ops import trident as T
from ..params import Param, boolean, non_negative, positive, positive_int, unit_interval
from ..tiling import resize_rows_from, row_bands
from .base import DenseStrategy, ImageContext, WindowContext, register_strategy

__all__ = ["Trident"]

_SAM_KEY = "trident_sam"  # ImageContext.extra: the full SAM picture's embedding for the refinement
_DECODER_BATCH = 16  # prompts per mask-decoder call (memory only: every prompt is decoded on its own)


def _multiple_of_8(name: str, value: Any) -> int:
    out = positive_int(name, value)
    if out % 8:
        raise InvalidInputError(f"{name} must be a positive multiple of 8 pixels, got {value!r}")
    return out


@register_strategy
class Trident(DenseStrategy):
    """Trident's dense computation and SAM refinement (the official code's defaults, ``configs/base_config.py``
    with ``--sam_refine``)."""

    name = "trident"
    doc = ("Trident (ICCV 2025): CLIP + DINO on spliced sub-images, aggregated by SAM's correlation, refined by "
           "prompting SAM")
    native_grid = True
    params = (
        Param("crop", 336, "sub-image size in pixels (slide_crop)", _multiple_of_8),
        Param("slide_stride", 224, "step between sub-images in pixels (slide_stride)", _multiple_of_8),
        Param("beta", 1.2, "proxy attention: masking threshold on the similarity, times its image mean",
              non_negative),
        Param("gamma", 3.0, "proxy attention: temperature", positive),
        Param("keep_diagonal", False, "never mask a token's own similarity (the reference does; True avoids NaN "
              "rows on a nearly uniform image)", boolean),
        Param("always_min", False, "raise inputs whose sides already are patch multiples to the sub-image size too "
              "(the reference skips it)", boolean),
        Param("cos_fac", 1.2, "SAM correlation: per-query threshold factor on the mean value cosine", non_negative),
        Param("refine_neg_cos", True, "SAM correlation: keep negative thresholds (False: they become 0.6)", boolean),
        Param("sam_halves", False, "run SAM on the left and right halves of the picture (the reference's "
              "Cityscapes rule)", boolean),
        Param("window_batch", 16, "sub-images per CLIP/DINO forward (memory only)", positive_int),
        Param("sam_chunk", 512, "SAM correlation rows computed at a time (memory only)", positive_int),
        Param("refine", True, "refine the coarse label map by prompting SAM's mask decoder (needs "
              "'segment-anything')", boolean),
        Param("coarse_thresh", 0.2, "refinement: pixels whose best class probability is below it are unassigned; "
              "classes never reaching it are not refined", unit_interval),
        Param("sam_iou_thresh", 0.8, "refinement: SAM masks with a predicted IoU not above it are dropped",
              unit_interval),
        Param("min_area", 225, "refinement: smallest region (pixels at half resolution) that prompts SAM",
              positive_int),
        Param("mask_coeff", 0.005, "refinement: factor of the class probability given to SAM as mask prompt",
              non_negative),
        Param("batched_mask", False, "refinement: give SAM one mask prompt per region (the reference passes one "
              "3-D mask, which SAM's prompt encoder normalises over the wrong axis)", boolean),
    )

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.sam_decoder: Optional[nn.Module] = None

    @classmethod
    def vfm_roles(cls, options: Mapping[str, Any]) -> Dict[str, Optional[str]]:
        return {"vfm": "dino_b16", "sam": "sam_b16"}

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> Tuple[Tuple[str, str, str], ...]:
        if options.get("refine", True):
            return (("segment_anything", "sam",
                     "Trident's SAM refinement (refine=True; pass refine=False to run without it)"),)
        return ()

    # ------------------------------------------------------------------ model parts
    def setup(self, model) -> None:
        if self.options["refine"] and self.sam_decoder is None:
            from ..backbones.sam import build_sam_decoder

            self.sam_decoder = build_sam_decoder(model._get_vfm("sam"))

    @staticmethod
    def _patch(model) -> int:
        ph, pw = model.clip.patch_size
        if ph != pw:
            raise InvalidInputError(f"Trident needs a CLIP with square patches, got {(ph, pw)}")
        return int(ph)

    def batch_key(self, model, image: ImageContext) -> Hashable:
        """Images are batched only with images of the same SAM picture size (it fixes the output grid)."""
        return T.sam_source_size(*image.size, patch=self._patch(model))

    # ------------------------------------------------------------------ windows
    def _whole_image(self, context: WindowContext, n: int, crop: torch.Tensor) -> Optional[ImageContext]:
        """The image of window ``n`` when the window is that whole (resized, unpadded) image and its pixels are
        known; None otherwise (then SAM sees the window itself)."""
        if n >= len(context.images) or n >= len(context.boxes) or any(context.pad):
            return None
        ctx = context.images[n]
        h, w = ctx.x.shape[-2:]
        if ctx.rgb is None or tuple(context.boxes[n]) != (0, h, 0, w) or tuple(crop.shape[-2:]) != (h, w):
            return None
        return ctx

    def _sam_picture(self, model, crop: torch.Tensor, ctx: Optional[ImageContext]) -> torch.Tensor:
        """SAM's picture (3, Ht, Wt) uint8: the original image (or the window) with its sides rounded up to
        multiples of the CLIP patch (OpenCV's fixed-point bilinear rule, as the reference's ``cv2.resize``)."""
        if ctx is not None:
            rgb = torch.as_tensor(ctx.rgb).to(crop.device).permute(2, 0, 1)  # (3, H0, W0) uint8
        else:  # the CLIP-normalised window, back to 0-255
            x = crop.float() * model.clip_std[0].float() + model.clip_mean[0].float()
            rgb = (x * 255.0).round().clamp(0, 255).to(torch.uint8)
        size = T.sam_source_size(rgb.shape[-2], rgb.shape[-1], patch=self._patch(model))
        return T.resize_linear_uint8(rgb, size)

    def _sam_pass(self, model, picture: torch.Tensor) -> Dict[str, Any]:
        """One SAM encoder pass on a uint8 picture (3, h, w): its correlation matrix W (1, Ns, Ns) on the valid
        grid, that grid, and the neck output (1, 256, 64, 64) with the frame sizes the refinement needs."""
        sam = model._get_vfm("sam")
        long_side = int(sam.input_size[0])
        mean = [255.0 * m for m in sam.mean]
        std = [255.0 * s for s in sam.std]
        inp, resized = T.sam_preprocess(picture[None], long_side=long_side, mean=mean, std=std)
        p = next(sam.parameters())
        last = sam.num_blocks - 1
        out = sam.forward_intermediates(inp.to(p.dtype), Collect(qkv=(last,)))
        q, k, v = out.qkv[last]
        attn = sam.vit.blocks[last].attn
        valid = T.sam_valid_grid(resized, patch=sam.patch_size)
        w = T.sam_global_weights(q, k, v, rel_pos_h=attn.rel_pos_h, rel_pos_w=attn.rel_pos_w, size=out.grid,
                                 valid=valid, cos_fac=self.options["cos_fac"],
                                 refine_neg_cos=self.options["refine_neg_cos"], scale=attn.scale,
                                 chunk=self.options["sam_chunk"])
        return dict(weights=w, valid=valid, neck=out.x, input_size=resized, picture=tuple(picture.shape[-2:]))

    def _spliced(self, model, crops: torch.Tensor) -> torch.Tensor:
        """Sub-images of every image through DINO and CLIP's proxy-attention last block, spliced: (N, D, gh, gw)
        on the CLIP token grid of the up-scaled input (times the splice ratio)."""
        o = self.options
        p = self._patch(model)
        x = T.upscale_input(crops, patch=p, crop=o["crop"], always_min=o["always_min"])  # (N, 3, H', W')
        n, _, hh, ww = x.shape
        boxes = T.window_token_boxes(hh, ww, patch=p, window=o["crop"], stride=o["slide_stride"])  # (Nw, 4)
        nw = boxes.shape[0]
        jobs = [(i, b) for i in range(n) for b in boxes.tolist()]  # image-major, row-major windows

        def cut(part: List[Tuple[int, List[int]]]) -> torch.Tensor:
            return torch.stack([x[i, :, y1 * p:y2 * p, x1 * p:x2 * p] for i, (y1, x1, y2, x2) in part])

        chunks = [jobs[j:j + o["window_batch"]] for j in range(0, len(jobs), o["window_batch"])]
        vfm = torch.cat([model.vfm_features(cut(part), "vfm") for part in chunks])  # (N·Nw, C, I, J)
        m = vfm.shape[-2] * vfm.shape[-1]
        sums = T.window_similarity_sums(vfm).view(n, nw)
        mean = (sums.sum(dim=1) / (nw * m * m)).repeat_interleave(nw)  # (N·Nw,): one mean per image
        blk = model.clip.block(-1)
        outs, start, side = [], 0, None
        for part in chunks:
            win = cut(part)
            inter = model.clip.forward_intermediates(win)  # one trunk pass: the input of the last block
            _, _, v = model.clip.qkv(-1, blk.ln_1(inter.x), "v")  # (c, nh, 1+g·g, hd)
            feats = vfm[start:start + len(part)]
            vals = T.window_values(v, grid=inter.grid, vfm_feats=feats, windows_per_image=1, beta=o["beta"],
                                   gamma=o["gamma"], keep_diagonal=o["keep_diagonal"],
                                   mean=mean[start:start + len(part)])  # (c, nh, I·J, hd)
            z = model.clip.attn_out(-1, vals)  # (c, I·J, D): out_proj, no residual, no FFN
            z = z.transpose(1, 2).reshape(z.shape[0], z.shape[2], feats.shape[-2], feats.shape[-1])
            (rh, sh), (rw, sw) = (T.window_grid_ratio(feats.shape[-2], inter.grid[0]),
                                  T.window_grid_ratio(feats.shape[-1], inter.grid[1]))
            if rh != rw or rh < 1:
                raise InvalidInputError(f"the VFM grid {tuple(feats.shape[-2:])} and CLIP grid {inter.grid} of a "
                                        "sub-image give no common splice ratio")
            side = (rh, (sh, sw))
            outs.append(T.to_window_grid(z, (sh, sw)))
            start += len(part)
        ratio, size = side
        z = torch.cat(outs).view(n, nw, -1, *size)
        return T.splice_windows(z, boxes, (hh // p, ww // p), ratio=ratio)  # (N, D, gh·r, gw·r)

    def forward(self, model, crops: torch.Tensor, context: WindowContext) -> torch.Tensor:
        """Windows (whole resized images in whole-image mode) (N, 3, H, W) -> features (N, E, sh, sw) on SAM's grid
        (not normalised); all N must share the SAM picture size (see :meth:`batch_key`)."""
        spliced = self._spliced(model, crops)  # (N, D, gh, gw)
        feats, grid = [], None
        for n in range(crops.shape[0]):
            ctx = self._whole_image(context, n, crops[n])
            picture = self._sam_picture(model, crops[n], ctx)  # (3, Ht, Wt) uint8
            if self.options["sam_halves"]:
                half = picture.shape[-1] // 2
                passes = [self._sam_pass(model, picture[..., :half]), self._sam_pass(model, picture[..., half:])]
                tokens = T.aggregate_halves([s["weights"] for s in passes], spliced[n:n + 1],
                                            [s["valid"] for s in passes])
                g = (passes[0]["valid"][0], passes[0]["valid"][1] + passes[1]["valid"][1])
            else:
                sam = self._sam_pass(model, picture)
                tokens = T.aggregate(sam["weights"], spliced[n:n + 1], sam["valid"])  # (1, Ns, D)
                g = sam["valid"]
                if ctx is not None and self.options["refine"]:
                    ctx.extra[_SAM_KEY] = {k: sam[k] for k in ("neck", "input_size", "picture")}
            if grid is not None and g != grid:
                raise InvalidInputError(f"the images of one batch give different SAM grids ({grid} and {g}); batch "
                                        "images with the same strategy.batch_key (Segmenter does)")
            grid = g
            e = model.clip.project(tokens)  # (1, Ns, E): ln_post, proj
            feats.append(e.transpose(1, 2).reshape(1, e.shape[-1], *g))
        return torch.cat(feats)

    # ------------------------------------------------------------------ refinement
    def postprocess(self, model, label_map: torch.Tensor, image: ImageContext, scores_at: Any = None) -> torch.Tensor:
        """SAM refinement of the coarse label map (H0, W0) (reference ``sam_refinement``), band by band at full
        resolution: memory holds the label maps, the class probabilities of the classes present at half
        resolution and one refined score map per refined class."""
        o = self.options
        if not o["refine"] or scores_at is None or image.rgb is None:
            return label_map
        h0, w0 = label_map.shape
        dh, dw = h0 // 2, w0 // 2
        if dh < 1 or dw < 1:
            return label_map
        dev = label_map.device
        tau = o["coarse_thresh"]
        present = torch.unique(label_map).tolist()
        # class probabilities at half resolution (bilinear from full resolution), for the classes present only
        probs_d = torch.empty((len(present), dh, dw), device=dev)
        best_d = torch.empty((dh, dw), device=dev)
        num_classes = None
        for r0, r1 in row_bands(dh, w0, 1 << 20):
            band = resize_rows_from(lambda a, b: scores_at((h0, w0), rows=(a, b)), (h0, w0), (dh, dw), r0, r1,
                                    device=dev)  # (C, r1 - r0, dw)
            num_classes = band.shape[0]
            best_d[r0:r1] = band.max(dim=0).values
            probs_d[:, r0:r1] = band[present]
        labels_d = F.interpolate(label_map[None, None].float(), size=(dh, dw), mode="nearest")[0, 0].long()
        if tau > 0:
            labels_d = torch.where(best_d < tau, torch.full_like(labels_d, num_classes), labels_d)
        refined: Dict[int, torch.Tensor] = {}
        for j, c in enumerate(present):
            if c >= num_classes or probs_d[j].max() < tau:
                continue
            found = T.class_regions(labels_d == c, probs_d[j], min_area=o["min_area"])
            if found is None:
                continue
            _, points, boxes = found
            score = self._refine_class(model, image, points, boxes, probs_d[j], (h0, w0))
            if score is not None:
                refined[c] = score
        if not refined:
            return label_map
        out = label_map.clone()
        for r0, r1 in row_bands(h0, w0, 1 << 20):
            probs = scores_at((h0, w0), rows=(r0, r1))  # (C, r1 - r0, W0)
            best = torch.zeros((r1 - r0, w0), device=dev)
            arg = torch.zeros((r1 - r0, w0), dtype=torch.long, device=dev)
            for c in sorted(refined):  # argmax over classes, ties to the lowest
                r = refined[c][r0:r1] * probs[c]
                better = r > best
                best = torch.where(better, r, best)
                arg = torch.where(better, torch.full_like(arg, c), arg)
            out[r0:r1] = torch.where(best == 0, label_map[r0:r1], arg)  # no refined score: the coarse label
        return out

    def _sam_embedding(self, model, image: ImageContext) -> Dict[str, Any]:
        """The embedding of the whole SAM picture (kept from the forward pass, else one more encoder pass, as the
        reference does for its Cityscapes halves)."""
        if _SAM_KEY not in image.extra:
            picture = self._sam_picture(model, image.x, image)
            sam = self._sam_pass(model, picture)
            image.extra[_SAM_KEY] = {k: sam[k] for k in ("neck", "input_size", "picture")}
        return image.extra[_SAM_KEY]

    def _refine_class(self, model, image: ImageContext, points: torch.Tensor, boxes: torch.Tensor,
                      prob_d: torch.Tensor, size: Tuple[int, int]) -> Optional[torch.Tensor]:
        """One class: SAM masks of its regions, those with a predicted IoU above ``sam_iou_thresh`` kept; returns
        ``max_k σ(l_k) · [∪_k l_k > 0]`` (H0, W0) (the refined score is that times the class probability), or None
        when no mask is kept."""
        o = self.options
        self.setup(model)  # after configure(refine=True) the decoder is built here
        emb = self._sam_embedding(model, image)
        decoder = self.sam_decoder
        dtype = next(decoder.parameters()).dtype
        prompts = T.prompt_tensors(points, boxes, prob_d, image_size=size, coarse_thresh=o["coarse_thresh"],
                                   mask_coeff=o["mask_coeff"], batched_mask=o["batched_mask"])
        feats = emb["neck"].to(dtype)
        prompts = {k: t.to(feats.device) for k, t in prompts.items()}
        best, union = None, None
        dev_type = feats.device.type
        with torch.autocast(device_type=dev_type, enabled=False):  # the reference's decoder runs in fp32
            for j in range(0, points.shape[0], _DECODER_BATCH):
                sl = slice(j, j + _DECODER_BATCH)
                mask = prompts["mask_input"] if not o["batched_mask"] else prompts["mask_input"][sl]
                low, iou = decoder(feats, point_coords=prompts["point_coords"][sl].to(dtype),
                                   point_labels=prompts["point_labels"][sl].to(dtype),
                                   boxes=prompts["boxes"][sl].to(dtype), mask_input=mask.to(dtype))
                keep = iou[:, 0] > o["sam_iou_thresh"]
                for lr in low[keep]:  # one region at a time at full resolution
                    logit = T.sam_masks_to_image(lr[None].float(), input_size=emb["input_size"],
                                                 original_size=emb["picture"], image_size=size)[0, 0]  # (H0, W0)
                    s = logit.sigmoid()
                    m = logit > 0
                    best = s if best is None else torch.maximum(best, s)
                    union = m if union is None else union | m
        if best is None:
            return None
        return best * union
