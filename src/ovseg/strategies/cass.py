"""CASS (Kim et al., CVPR 2025): spectral object-level context distillation from DINO into CLIP's last-block
attention, and the object-presence prior that adjusts the text embeddings per window (docs/methods.md, "CASS").

Per batch of windows, from one CLIP trunk forward and one VFM forward that stops at the last block's keys:

1. CLIP blocks 0..L−2 -> ``x`` (B, 1+L, D); the last block's ``ln_1`` and in-projection -> ``k, v`` (CLS first).
2. The VFM input is built from the CLIP-normalised windows the way the reference builds it
   (:func:`ovseg.ops.cass.dino_input`, bypassing the model's VFM normalisation buffers); the VFM's last-block keys
   (prefix tokens dropped) come from ``forward_intermediates`` with ``Collect(qkv=(-1,), stop=True)``.
3. :func:`ovseg.ops.cass.cass_attention` -> ``out_proj`` -> ``ln_post`` -> ``proj`` (no residual, no FFN, no CLS)
   -> unit-norm patch features F (B, L, E).
4. The prior ``g = cos(CLS, T)`` from the unmodified last block's CLS of the whole resized image (computed once per
   image in :meth:`CASS.prepare`) or of the window itself (``prior_cls="window"``), the text clusters (cached per
   label set and threshold) and :func:`ovseg.ops.cass.presence_logits` -> window logits (B, Q, gh, gw).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from ..backbones.hooks import Collect
from ..errors import InvalidInputError
from ..ops.cass import cass_attention, cluster_texts, dino_input, presence_logits, presence_prior
from ..params import Param, boolean, non_negative, non_negative_int, one_of, positive, positive_int, unit_interval
from .base import DenseStrategy, ImageContext, WindowContext, register_strategy

__all__ = ["CASS"]

_CLS_KEY = "cass_cls"
_GEN_KEY = "cass_generator"


@register_strategy
class CASS(DenseStrategy):
    """CASS's per-window computation. Declared defaults are the official constructor's (its bare ``dataset``
    default, VOC20, switches eigenscaling off; β = α = h_threshold = 0 switch the object-presence prior off); the
    ``cass`` preset and the evaluation presets set the per-dataset values of the official configs."""

    name = "cass"
    doc = "CASS (CVPR 2025): DINO's low-rank attention graph distilled into CLIP's last block, object-presence prior"
    needs_text = True
    params = (
        Param("beta", 0.0, "weight of the object-presence prior in the logits (global_semantics_weight)",
              unit_interval),
        Param("alpha", 0.0, "step of the most present query towards its top-2 patches (mean_vector_weight)",
              unit_interval),
        Param("h_threshold", 0.0, "Ward-linkage cut height grouping the text queries", non_negative),
        Param("prior_cls", "image", "CLS of the prior: 'image' (whole resized image, once per image) or "
              "'window' (each window's own)", one_of("image", "window")),
        Param("eigenscaling", False, "stretch the rank-r singular values to [min/2, 1.5 max] (official: every "
              "dataset but VOC20 and Cityscapes; the bare constructor: off)", boolean),
        Param("matching", "spectral", "head pairing: 'spectral' (Hungarian on eigenvalue distances) or "
              "'sequential' (head h with head h, plain average)", one_of("spectral", "sequential")),
        Param("swap_quirk", True, "apply the Hungarian pairing in the reference's (swapped) direction", boolean),
        Param("spectra", "graph", "eigenvalues for the matching: 'graph' (L x L, bit-faithful ties) or 'gram' "
              "(hd x hd, faster)", one_of("graph", "gram")),
        Param("svd", "exact", "rank-r reconstruction: 'exact' (deterministic) or 'randomized' "
              "(torch.svd_lowrank's algorithm, seeded)", one_of("exact", "randomized")),
        Param("seed", 42, "seed of the per-image generator of svd='randomized'", non_negative_int),
        Param("rank", 10, "rank of the VFM graph reconstruction", positive_int),
        Param("num_eigs", 20, "eigenvalues compared per head", positive_int),
        Param("strength", 10.0, "scale of the matching weight in the convex combination (scale_factor)", positive),
        Param("sigma", 5.0, "standard deviation (patches) of the Gaussian window added to the logits", positive),
        Param("denormalize", "reference", "VFM input: 'reference' conversion of the CLIP-normalised window or "
              "'clip' (the exact pixels)", one_of("reference", "clip")),
        Param("square", True, "squash each window to a square of its short side for the VFM (reference)", boolean),
    )

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._clusters: Optional[Tuple[torch.Tensor, float, torch.Tensor]] = None

    @classmethod
    def vfm_roles(cls, options: Mapping[str, Any]) -> Dict[str, Optional[str]]:
        return {"vfm": "dino_b8"}

    def window_elements(self, model, height: int, width: int) -> int:
        """The per-head (L, L) float64 matrices alive at once (the two graphs, the reconstruction, the combined
        logits and the attention weights, ~6 of them at 2 float32 elements each); heads run one at a time."""
        gh, gw = model.clip.grid_size(height, width)
        return 12 * (gh * gw) ** 2

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _attn_norm(model, x: torch.Tensor) -> torch.Tensor:
        norm = getattr(model.clip, "attn_norm", None)
        if norm is None:
            raise InvalidInputError(f"strategy 'cass' needs a CLIP with per-block 'attn_norm' (ln_1); "
                                    f"{type(model.clip).__name__} has none")
        return norm(-1, x)

    @classmethod
    def _cls_embedding(cls, model, x: torch.Tensor, y: Optional[torch.Tensor] = None,
                       kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """The unmodified last block's CLS output, projected: x (B, 1+L, D) -> (B, E).

        Only the CLS row is computed; ``y = ln_1(x)`` and the per-head ``k, v`` (B, nh, 1+L, hd) are reused
        when given."""
        clip = model.clip
        y = cls._attn_norm(model, x) if y is None else y
        q = clip.qkv(-1, y[:, :1], "q")[0]  # (B, nh, 1, hd)
        k, v = clip.qkv(-1, y, "kv")[1:] if kv is None else kv
        o = F.scaled_dot_product_attention(q, k, v)  # (B, nh, 1, hd), scale hd^-1/2
        c = x[:, :1] + clip.block(-1).ls_1(clip.attn_out(-1, o))  # (B, 1, D)
        c = c + clip.ffn(-1, c)
        return clip.project(c)[:, 0]  # (B, E)

    def _vfm_keys(self, model, crops: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """The VFM's last-block patch keys (B, nh, Nv, hd) on its grid, from the reference's VFM input."""
        vfm = model.vfms["vfm"] if "vfm" in model.vfms else None
        if vfm is None or not hasattr(vfm, "forward_intermediates"):
            raise InvalidInputError("strategy 'cass' needs a ViT VFM with forward_intermediates in role 'vfm' "
                                    "(e.g. vfm='dino_b8')")
        x = dino_input(crops, denormalize=self.options["denormalize"], square=self.options["square"],
                       patch_size=vfm.patch_size)  # (B, 3, h', w') float32, ImageNet-normalised
        dtype = next(vfm.parameters()).dtype
        out = vfm.forward_intermediates(x.to(dtype), Collect(qkv=(-1,), stop=True))
        k = next(iter(out.qkv.values()))[1]  # (B, nh, prefix + Nv, hd)
        return k[:, :, getattr(vfm, "num_prefix", 1):], out.grid

    def _features(self, model, crops: torch.Tensor, context: WindowContext, *, want_cls: bool):
        """Unit-norm patch features (B, L, E), grid, and the windows' own CLS embeddings (B, E) when asked."""
        clip = model.clip
        out = clip.forward_intermediates(crops)
        x, grid = out.x, out.grid  # (B, 1+L, D)
        y = self._attn_norm(model, x)
        _, k, v = clip.qkv(-1, y, "kv")  # (B, nh, 1+L, hd)
        if grid[0] * grid[1] < 1:
            raise InvalidInputError(f"window {tuple(crops.shape[-2:])} has no CLIP patch")
        vk, vgrid = self._vfm_keys(model, crops)
        o = self._attention(k, v, grid, vk, vgrid, context)  # (B, nh, L, hd)
        feats = F.normalize(clip.project(clip.attn_out(-1, o)), dim=-1)  # (B, L, E)
        own = self._cls_embedding(model, x, y, (k, v)) if want_cls else None
        return feats, grid, own

    def _attention(self, k, v, grid, vk, vgrid, context: WindowContext) -> torch.Tensor:
        o = self.options
        kw = dict(grid=grid, vfm_grid=vgrid, sigma=o["sigma"], num_eigs=o["num_eigs"], rank=o["rank"],
                  strength=o["strength"], eigenscaling=o["eigenscaling"], swap_quirk=o["swap_quirk"],
                  matching=o["matching"], spectra=o["spectra"], svd=o["svd"])
        if o["svd"] == "exact":
            return cass_attention(None, k, v, vfm_keys=vk, **kw)
        # randomised: one generator per image, drawn window by window in the order the windows come (grid order)
        outs = []
        for i in range(k.shape[0]):
            gen = self._generator(context.images[i] if i < len(context.images) else None, k.device)
            outs.append(cass_attention(None, k[i:i + 1], v[i:i + 1], vfm_keys=vk[i:i + 1], generator=gen, **kw))
        return torch.cat(outs, dim=0)

    def _generator(self, image: Optional[ImageContext], device) -> torch.Generator:
        if image is not None and _GEN_KEY in image.extra:
            return image.extra[_GEN_KEY]
        gen = torch.Generator(device=device).manual_seed(self.options["seed"])
        if image is not None:
            image.extra[_GEN_KEY] = gen
        return gen

    def clusters(self, text: torch.Tensor) -> torch.Tensor:
        """Cluster index per query (Q,), cached for the last label set and threshold."""
        thr = self.options["h_threshold"]
        cached = self._clusters
        if cached is not None and cached[1] == thr and cached[0].shape == text.shape and \
                cached[0].device == text.device and torch.equal(cached[0], text):
            return cached[2]
        out = cluster_texts(text, thr)
        self._clusters = (text.detach().clone(), thr, out)
        return out

    def set_options(self, options: Mapping[str, Any]) -> None:
        super().set_options(options)
        self._clusters = None

    # ------------------------------------------------------------------ hooks
    def prepare(self, model, image: ImageContext, text: Optional[torch.Tensor]) -> None:
        """The whole resized image's CLS embedding (plain CLIP, position embedding resized to its grid) for the
        prior, and a fresh generator for ``svd="randomized"``."""
        image.extra.pop(_GEN_KEY, None)
        if self.options["prior_cls"] == "image" and self.options["beta"] + self.options["alpha"] > 0:
            with torch.inference_mode():
                x = model.clip.forward_intermediates(image.x.unsqueeze(0).to(model.dtype)).x  # (1, 1+N, D)
                image.extra[_CLS_KEY] = self._cls_embedding(model, x)[0]  # (E,)

    def forward(self, model, crops: torch.Tensor, context: WindowContext) -> torch.Tensor:
        """Windows (B, 3, h, w) -> CASS's patch features (B, E, gh, gw) (before the object-presence prior)."""
        feats, grid, _ = self._features(model, crops, context, want_cls=False)
        return feats.transpose(1, 2).reshape(feats.shape[0], feats.shape[2], *grid)

    def window_logits(self, model, crops: torch.Tensor, text: torch.Tensor, context: WindowContext) -> torch.Tensor:
        """Windows -> ``(1−β)·F T'ᵀ + β·g`` (B, Q, gh, gw), T' adjusted per window (docs/methods.md, "CASS")."""
        o = self.options
        b = crops.shape[0]
        use_prior = o["beta"] + o["alpha"] > 0
        images = list(context.images)
        cls_of_image = use_prior and o["prior_cls"] == "image" and len(images) == b and \
            all(_CLS_KEY in im.extra for im in images)
        feats, grid, own = self._features(model, crops, context, want_cls=use_prior and not cls_of_image)
        text = text.to(feats.dtype)
        if not use_prior:
            logits = feats @ text.T  # (B, L, Q): β = α = 0 leaves the cosine logits
        else:
            # without image contexts (a direct model call) each window is its own image
            cls = torch.stack([im.extra[_CLS_KEY] for im in images]) if cls_of_image else own  # (B, E)
            prior = presence_prior(cls.to(feats.dtype), text)  # (B, Q)
            logits = presence_logits(feats, text, prior, self.clusters(text), alpha=o["alpha"], beta=o["beta"])
        return logits.transpose(1, 2).reshape(b, text.shape[0], *grid)
