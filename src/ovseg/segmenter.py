"""Segmenter: the predictor around a :class:`ovseg.model.DenseModel` — inputs, labels, windows, head, results.

``Segmenter(method)`` resolves a preset (:mod:`ovseg.methods`), builds CLIP, the method's VFMs and its dense
strategy into one ``nn.Module`` (``seg.model``), caches text embeddings, and turns images into label maps:
resize → windows → ``model.window_logits`` → average → full-resolution post-processing (PAMR, the head, the
strategy's own refinement), one band of rows at a time. See docs/architecture.md.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from ._deps import require
from .backbones import build_clip, create_vfm
from .errors import InvalidInputError
from .head import Head, postprocess
from .methods import MethodCfg, get_method
from .model import DenseModel
from .params import unit_interval
from .precision import resolve_precision
from .preprocess import is_batch, load_image, normalize_clip, rescale_size, resize_image
from .result import SegmentationResult
from .sliding import WindowBatch, slide_inference, window_grid
from .strategies.base import DenseStrategy, ImageContext, WindowContext
from .text import LabelSet, TextClassifier, get_templates, parse_labels
from .tiling import pamr_rows, resize_rows, row_bands

logger = logging.getLogger(__name__)

__all__ = ["Segmenter", "postprocess"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidInputError(f"invalid device {device!r} ({e}); use 'cpu', 'cuda', 'cuda:1', 'mps'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device!r} requested but CUDA is not available here; use device='cpu'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InvalidInputError(f"device {device!r} requested but MPS is not available here; use device='cpu'")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InvalidInputError(f"device {device!r} is not supported; use 'cpu', 'cuda', 'cuda:1' or 'mps'")
    return dev


def _check_requirements(cfg: MethodCfg) -> None:
    """Raise ``MissingDependencyError`` (with the pip line) for an optional package the strategy needs."""
    for module, extra, what in cfg.strategy_cls.requirements(cfg.strategy_options):
        require(module, extra, what)


def _per_role(value: Any, roles: Sequence[str], what: str) -> Dict[str, Any]:
    """``value`` for the ``"vfm"`` role, or a mapping role -> value when its keys are all roles; ``"random"``
    weights apply to every role."""
    if what == "vfm_weights" and isinstance(value, str) and value == "random":
        return {role: "random" for role in roles}
    if isinstance(value, Mapping) and value and set(value) <= set(roles) and not (what == "vfm_kwargs" and
                                                                                  "vfm" not in roles):
        return dict(value)
    if isinstance(value, Mapping) and value and any(k in roles for k in value) and not set(value) <= set(roles):
        raise InvalidInputError(f"{what} mixes VFM roles and other keys: {sorted(value)}; roles: {sorted(roles)}")
    return {"vfm": value} if value is not None else {}


class Segmenter:
    """Training-free open-vocabulary semantic segmentation.

    Args:
        method: a preset from :func:`ovseg.list_methods` (``proxyclip``, ``naclip``, ``sclip``, ``clearclip``,
            ``maskclip``, ``clip``, ...).
        clip: open_clip architecture (default ``ViT-B-16``).
        clip_weights: open_clip pretrained tag, local checkpoint file or folder, or ``"random"`` (default
            ``openai``).
        clip_tag: for a local ``clip_weights`` file, the open_clip pretrained tag it holds (e.g. ``"openai"``);
            it decides the activation (QuickGELU or GELU). Needed when the file cannot be recognised and the
            architecture's tags disagree (docs/offline.md).
        vfm: the VFM of methods that use one (ProxyCLIP default ``dino_b8``); see :func:`ovseg.list_vfms`.
        vfm_weights: None (official weights), a local checkpoint path, or ``"random"`` (every VFM of the
            method); a mapping ``{role: weights}`` for methods with several VFMs (e.g. Trident's
            ``{"vfm": dino_file, "sam": sam_file}``; a plain path is the ``"vfm"`` role's).
        device: default CUDA when available, else CPU.
        precision: ``"auto"`` (default): fp16 autocast on CUDA, bf16 on a CPU with native bf16 (AMX,
            AVX512-BF16), fp32 otherwise (:func:`ovseg.precision.resolve_precision`; ``OVSEG_PRECISION`` pins it);
            or ``fp32``, ``fp16``, ``bf16`` (on a CPU without native support: a warning, it is emulated and slow).
        seed: seed for ``"random"`` weights.
        clip_kwargs: open_clip model-config overrides (e.g. a smaller ``vision_cfg`` for tests).
        vfm_kwargs: keyword options of the VFM builder, e.g. ``{"block": 1}`` for SD or
            ``{"model_kwargs": {...}}`` (architecture overrides for timm/diffusers); ``{role: {...}}`` per role.
        memory_budget: GB of activations for one batch of windows; the batch size then adapts to the window
            size (at least 1). Default: a fixed ``batch_size``.
        compile: compile the dense model with ``torch.compile`` (first calls per window shape compile).
        **options: the method's options: the pipeline's (``window``, ``stride``, ``short_side``, ``logit_scale``,
            ``threshold``, ``pamr_steps``, ``templates``, ``batch_size``, ...) and its strategy's (``attention``,
            ``sigma``, ``beta``, ...). ``None`` keeps the preset's value; an option the method does not have is an
            error. ``seg.cfg.option_names()`` lists them.

    Attributes:
        model: the :class:`ovseg.model.DenseModel` (an ``nn.Module``: CLIP, VFMs, strategy).
        cfg: the resolved :class:`ovseg.methods.MethodCfg`.
        text: the cached text classifier.
    """

    def __init__(
        self,
        method: str = "proxyclip",
        *,
        clip: Optional[str] = None,
        clip_weights: Optional[str] = None,
        clip_tag: Optional[str] = None,
        vfm: Optional[str] = None,
        vfm_weights: Any = None,
        device: Union[str, torch.device, None] = None,
        precision: Optional[str] = None,
        seed: int = 0,
        clip_kwargs: Optional[Dict[str, Any]] = None,
        vfm_kwargs: Optional[Dict[str, Any]] = None,
        memory_budget: Optional[float] = None,
        compile: bool = False,
        **options: Any,
    ):
        preset = get_method(method)
        if memory_budget is not None and (isinstance(memory_budget, bool) or
                                          not isinstance(memory_budget, (int, float)) or memory_budget <= 0):
            raise InvalidInputError(f"memory_budget must be a positive number of GB, got {memory_budget!r}")
        self.cfg: MethodCfg = preset.replace(clip=clip, clip_weights=clip_weights, vfm=vfm, **options)
        vfm_names = self.cfg.vfm_names()
        if vfm_weights is not None and not vfm_names:
            raise InvalidInputError(f"vfm_weights was given but method '{method}' uses no VFM")
        weights_by_role = _per_role(vfm_weights, list(vfm_names), "vfm_weights")
        kwargs_by_role = _per_role(vfm_kwargs, list(vfm_names), "vfm_kwargs")
        self.device = _resolve_device(device)
        self.precision_request = "auto" if precision is None else precision
        self.precision = resolve_precision(self.precision_request, self.device)  # "fp32", "fp16" or "bf16"
        self.templates = get_templates(self.cfg.templates)
        _check_requirements(self.cfg)  # a missing optional package fails before anything is built or downloaded
        clip_model = build_clip(self.cfg.clip, self.cfg.clip_weights, tag=clip_tag, seed=seed,
                                model_kwargs=clip_kwargs)
        vfms = {role: create_vfm(name, weights_by_role.get(role), seed=seed, **(kwargs_by_role.get(role) or {}))
                for role, name in vfm_names.items()}
        strategy = self.cfg.strategy_cls(**self.cfg.strategy_options)
        self.model = DenseModel(clip_model, strategy, vfms).to(self.device).eval()
        self.text = TextClassifier(self.model.clip)  # .progress = True: a bar when hundreds of prompts are encoded
        # full-resolution post-processing works on bands of rows: at most band_pixels pixels and about band_bytes
        # of float32 temporaries (the band's logits, class scores and their softmax, ~3 x (Q + C) per pixel)
        self.band_pixels = 1 << 21
        self.band_bytes = 256 << 20
        self.memory_budget = memory_budget
        self.compiled = bool(compile)
        if compile:
            self.model.compile(dynamic=False)

    # ------------------------------------------------------------------ plumbing
    @property
    def method(self) -> str:
        return self.cfg.name

    @property
    def clip(self) -> torch.nn.Module:
        return self.model.clip

    @property
    def vfm(self) -> Optional[torch.nn.Module]:
        return self.model.vfm

    @property
    def strategy(self) -> DenseStrategy:
        return self.model.strategy

    @property
    def head(self) -> Head:
        return Head(logit_scale=self.cfg.logit_scale, threshold=self.cfg.threshold,
                    area_threshold=self.cfg.area_threshold)

    def __repr__(self) -> str:
        vfms = self.cfg.vfm_names()
        vfm = "".join(f", {'vfm' if r == 'vfm' else r}={n!r}" for r, n in vfms.items())
        act = getattr(self.clip, "activation", None)
        act = f", clip_activation={act!r}" if act else ""
        return (f"Segmenter({self.cfg.name!r}, clip={self.cfg.clip!r}, clip_weights={self.clip.weights!r}{act}{vfm}, "
                f"device='{self.device}', precision={self.precision!r})")

    def settings(self) -> Dict[str, Any]:
        """Every setting that shapes a result, JSON-friendly: the method's options (pipeline and strategy), the
        weights (with the CLIP activation and identity when known), VFMs, precision, device and ovseg's version."""
        vfms = {}
        for role, vfm in self.model.vfms.items():
            vfms[role] = {"name": self.cfg.vfm_names().get(role), "weights": getattr(vfm, "weights", None)}
        return {
            "ovseg": __version__, "method": self.cfg.as_dict(), "clip": self.cfg.clip,
            "clip_weights": getattr(self.clip, "weights", None),
            "clip_activation": getattr(self.clip, "activation", None),
            "clip_identity": getattr(self.clip, "identity", None), "vfms": vfms,
            "templates": list(self.templates), "precision": self.precision, "device": self.device.type,
        }

    def to(self, device: Union[str, torch.device]) -> "Segmenter":
        """Move the model; on failure (e.g. out of memory) everything stays where it was."""
        new = _resolve_device(device)
        old = self.device
        precision = resolve_precision(self.precision_request, new)  # "auto" follows the device
        try:
            self.model.to(new)
        except Exception:
            self.model.to(old)
            raise
        self.device, self.precision = new, precision
        return self

    def configure(self, **options: Any) -> "Segmenter":
        """Change inference options (``window``, ``stride``, ``short_side``, ``threshold``, ``logit_scale``,
        ``pamr_steps``, ``templates``, strategy options such as ``sigma``, ...) without reloading any model;
        ``window=0`` selects whole-image mode. Atomic: a bad value leaves the Segmenter unchanged."""
        fixed = sorted({"clip", "clip_weights", "vfm", "vfms", "strategy"} & set(options))
        if fixed:
            raise InvalidInputError(f"{', '.join(fixed)} cannot be changed by configure(); build a new Segmenter")
        cfg = self.cfg.replace(**options)
        if cfg.vfm_names() != self.cfg.vfm_names():
            raise InvalidInputError("these options change the VFMs the method needs; build a new Segmenter")
        templates = get_templates(cfg.templates)
        strategy_options = cfg.strategy_options
        _check_requirements(cfg)
        # everything is validated: commit
        self.model.strategy.set_options(strategy_options)
        self.cfg, self.templates = cfg, templates
        self.model.strategy.setup(self.model)  # parts the new options need (built once, kept afterwards)
        return self

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision])

    def text_embeddings(self, labels: Union[LabelSet, Sequence]) -> torch.Tensor:
        """(Q, E) unit-norm float32 query embeddings (cached)."""
        return self.text(parse_labels(labels).queries, self.templates, device=self.device)

    def window_bytes(self, height: int, width: int) -> int:
        """Rough activation memory of one (height x width) window: the widest tensors of the CLIP and VFM
        blocks (q, k, v and the MLP hidden ~ 10 x tokens x width) and the proxy attention (3 x M²)."""
        itemsize = 4 if self.precision == "fp32" else 2
        gh, gw = self.clip.grid_size(height, width)
        total = 10 * (gh * gw + 1) * self.clip.width
        for vfm in self.model.vfms.values():
            vh, vw = vfm.grid_size(height, width)
            total += 10 * vh * vw * int(getattr(vfm, "width", vfm.embed_dim)) + 3 * (vh * vw) ** 2
        total += self.model.strategy.window_elements(self.model, height, width)
        return total * itemsize

    def batch_size_for(self, height: int, width: int) -> int:
        """Windows per forward pass for this window size (``memory_budget`` or the fixed ``batch_size``)."""
        if self.memory_budget is None:
            return self.cfg.batch_size
        return max(1, min(256, int(self.memory_budget * 2**30 // self.window_bytes(height, width))))

    def forward_features(self, crops: torch.Tensor, text: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Windows (N, 3, h, w), CLIP-normalised -> unit-norm dense features (N, E, h', w') float32."""
        with self._autocast():
            return self.model(crops.to(self.device), text=text)

    # ------------------------------------------------------------------ inference
    def _prepare(self, index: int, src: Any, masks: Any = None) -> ImageContext:
        """One image -> its context: uint8 (H0, W0, 3) RGB and the CLIP-normalised resized (3, H, W) tensor."""
        rgb = load_image(src)
        if isinstance(rgb, np.ndarray):
            h0, w0 = rgb.shape[:2]
            if not rgb.flags.writeable:
                rgb = rgb.copy()
            img = torch.from_numpy(rgb).permute(2, 0, 1)  # uint8 view, no full-size float copy
        else:
            h0, w0 = rgb.shape[-2:]
            img = rgb * 255.0
        size = (h0, w0)
        if self.cfg.short_side is not None:
            size = rescale_size(h0, w0, self.cfg.short_side, self.cfg.long_max)
        ph, pw = self.clip.patch_size
        if size[0] < ph or size[1] < pw:
            raise InvalidInputError(f"image of size {h0}x{w0} is too small or too elongated: resized to "
                                    f"{size[0]}x{size[1]}, smaller than one {ph}x{pw} CLIP patch")
        x = normalize_clip(resize_image(img.to(self.device), size).float())
        if not isinstance(rgb, np.ndarray):
            rgb = (rgb * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        mask_t = None
        if masks is not None:  # a label image or boolean masks -> one (H0, W0) int64 region map (ovseg.masks)
            from .masks import as_region_map

            mask_t = as_region_map(masks, (h0, w0))
        return ImageContext(index=index, x=x, rgb=rgb, masks=mask_t)

    def _infer(self, images: Sequence[Any], labelset: LabelSet, progress: bool, masks: Optional[Sequence] = None
               ) -> Tuple[List[ImageContext], List[torch.Tensor]]:
        """Window-averaged cosine logits (Q, H, W) at each image's resized resolution (on the strategy's own grid
        for ``native_grid`` strategies in whole-image mode), with the image contexts."""
        text = self.text(labelset.queries, self.templates, device=self.device)
        contexts = [self._prepare(i, src, None if masks is None else masks[i]) for i, src in enumerate(images)]
        strategy = self.model.strategy
        with self._autocast():
            for ctx in contexts:
                strategy.prepare(self.model, ctx, text)
        aux = [getattr(strategy, "aux_maps", lambda c: {})(ctx) for ctx in contexts]
        native = strategy.native_grid and self.cfg.window is None
        keys = [strategy.batch_key(self.model, ctx) for ctx in contexts]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            total = sum(1 if self.cfg.window is None else
                        len(window_grid(c.x.shape[-2], c.x.shape[-1], self.cfg.window, self.cfg.stride))
                        for c in contexts)
            bar = tqdm(total=total, desc="windows", unit="win")

        def window_fn(crops: torch.Tensor, batch: WindowBatch) -> torch.Tensor:
            context = WindowContext(text=text, images=[contexts[i] for i in batch.image_index], boxes=batch.boxes,
                                    pad=batch.pad, aux=batch.aux)
            with self._autocast():
                return self.model.window_logits(crops, text, context)

        batch_size = self.cfg.batch_size if self.memory_budget is None else self.batch_size_for
        logits = slide_inference([c.x for c in contexts], window_fn, window=self.cfg.window, stride=self.cfg.stride,
                                 pad_multiple=self.cfg.pad_multiple, batch_size=batch_size,
                                 progress=bar.update if bar is not None else None,
                                 aux=aux if any(aux) else None, with_context=True, native=native,
                                 group_keys=keys)
        if bar is not None:
            bar.close()
        return contexts, logits

    def _band_logits(self, ctx: ImageContext, lg: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of the logits at the input's size, after PAMR when enabled: (Q, r1 - r0, W0) float32."""
        size = ctx.size
        if self.cfg.pamr_steps > 0:
            return pamr_rows(ctx.x, lg, size, r0, r1, steps=self.cfg.pamr_steps, dilations=self.cfg.pamr_dilations)
        return resize_rows(lg, size, r0, r1)

    def _bands(self, ctx: ImageContext, progress: bool, what: str, channels: int = 1):
        h0, w0 = ctx.size
        pixels = max(w0, min(self.band_pixels, self.band_bytes // (12 * max(channels, 1))))
        if self.cfg.pamr_steps > 0:  # PAMR bands carry steps·max(d) halo rows on each side: keep them <= 1/2
            pixels = max(pixels, 4 * self.cfg.pamr_steps * max(self.cfg.pamr_dilations) * w0)
        bands = list(row_bands(h0, w0, pixels))
        if progress and (len(bands) > 1 or self.cfg.pamr_steps > 0):
            from tqdm.auto import tqdm

            return tqdm(bands, desc=what, unit="band", leave=False)
        return bands

    def _finish(self, ctx: ImageContext, lg: torch.Tensor, labelset: LabelSet, head: Head, *,
                return_logits: bool = False, return_probs: bool = False, progress: bool = False,
                on_device: bool = False) -> Dict[str, Any]:
        """Full-resolution post-processing, one band of rows at a time (``ovseg.tiling``): resize (and PAMR), the
        head (with its area filter), the strategy's refinement; memory beyond the outputs stays bounded."""
        h0, w0 = ctx.size
        nq, nc = len(labelset.queries), labelset.num_classes
        qc = labelset.query_class
        strategy = self.model.strategy
        refines = type(strategy).postprocess is not DenseStrategy.postprocess
        dropped = None
        if head.area_threshold > 0:
            counts = torch.zeros(nc, dtype=torch.int64, device=lg.device)
            for r0, r1 in self._bands(ctx, progress, "area filter", nq + nc):
                counts += head.area_counts(head.scores(self._band_logits(ctx, lg, r0, r1), qc, nc))
            dropped = head.dropped_classes(counts)
        out_dev = lg.device if on_device else torch.device("cpu")
        labels = torch.empty((h0, w0), dtype=torch.int64, device=out_dev)
        score = torch.empty((h0, w0), dtype=torch.float32, device=out_dev) if not on_device else None
        probs = torch.empty((nc, h0, w0), dtype=torch.float32, device=out_dev) if return_probs else None
        logits = torch.empty((nq, h0, w0), dtype=torch.float32, device=out_dev) if return_logits else None
        need_values = (score is not None or probs is not None or logits is not None)
        for r0, r1 in self._bands(ctx, progress, "post-processing", nq + nc):
            band = self._band_logits(ctx, lg, r0, r1)
            scores = head.scores(band, qc, nc)
            lab, _ = head.classify(scores, dropped)
            labels[r0:r1] = lab.to(out_dev)
            if not refines and need_values:
                self._fill(r0, r1, band, scores, lab, score, probs, logits, out_dev)
        if refines:
            def scores_at(size: Tuple[int, int], rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
                if rows is not None:  # a band of rows: bounded memory at full resolution
                    return head.scores(resize_rows(lg, tuple(size), int(rows[0]), int(rows[1])), qc, nc)
                small = F.interpolate(lg[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
                return head.scores(small, qc, nc)

            labels = strategy.postprocess(self.model, labels.to(lg.device), ctx, scores_at).to(out_dev)
            if need_values:
                for r0, r1 in self._bands(ctx, progress, "post-processing", nq + nc):
                    band = self._band_logits(ctx, lg, r0, r1)
                    self._fill(r0, r1, band, head.scores(band, qc, nc), labels[r0:r1].to(lg.device), score, probs,
                               logits, out_dev)
        return {"labels": labels, "score": score, "probs": probs, "logits": logits}

    @staticmethod
    def _fill(r0: int, r1: int, band: torch.Tensor, scores: torch.Tensor, lab: torch.Tensor, score, probs, logits,
              out_dev: torch.device) -> None:
        total = scores.sum(dim=0, keepdim=True)  # class probabilities are renormalised to sum to 1 per pixel
        if score is not None:
            score[r0:r1] = (scores.gather(0, lab[None]) / total)[0].to(out_dev)
        if probs is not None:
            probs[:, r0:r1] = (scores / total).to(out_dev)
        if logits is not None:
            logits[:, r0:r1] = band.to(out_dev)

    def _threshold(self, threshold: Any) -> float:
        if threshold is None:
            return float(self.cfg.threshold)
        return unit_interval("threshold", threshold)

    def _images(self, image: Any) -> Tuple[bool, List[Any]]:
        batch = is_batch(image)
        images = list(image) if batch else [image]
        if not images:
            raise InvalidInputError("no images given (empty list)")
        return batch, images

    def _masks(self, masks: Any, batch: bool, n: int) -> Optional[List[Any]]:
        if masks is None:
            return None
        if not self.model.strategy.uses_masks:
            raise InvalidInputError(f"method '{self.cfg.name}' does not use region masks; masks= is for methods "
                                    "that do (e.g. 'corrclip')")
        masks = list(masks) if batch else [masks]
        if len(masks) != n:
            raise InvalidInputError(f"got {len(masks)} masks for {n} images; give one label image per image "
                                    "(None for an image whose masks the method should generate)")
        return masks

    def predict(
        self,
        image: Any,
        labels: Union[LabelSet, Sequence],
        *,
        threshold: Optional[float] = None,
        return_logits: bool = False,
        return_probs: bool = False,
        progress: bool = False,
        masks: Any = None,
    ) -> Union[SegmentationResult, List[SegmentationResult]]:
        """Segment one image (path, PIL image, uint8 HxWx3 array, float (3, H, W) tensor in [0, 1]) or a list
        of them / a (B, 3, H, W) tensor (returns a list).

        Args:
            labels: list of class names; ``"sofa; couch"`` or ``["sofa", "couch"]`` gives synonyms.
            threshold: pixels whose best class score is below it go to ``labels[0]`` (the references'
                ``prob_thd``; default: the method's). It compares the class score *before* renormalisation
                (softmax over all queries, max over synonyms), so ``res.probs``/``res.score`` (renormalised over
                classes) can be above it where the label was still set to ``labels[0]``.
            return_logits: also keep the per-query cosine logits (Q, H, W) (after PAMR when enabled).
            return_probs: also keep the class probabilities (C, H, W) float32 (memory: 4·C·H·W bytes; off by
                default, ``res.score`` always holds the probability of the chosen label).
            progress: show progress bars over windows and over full-resolution post-processing.
            masks: region masks for methods that use them (CorrCLIP), per image: an integer label image (H, W)
                (equal values form a region; its smallest value means "no mask"), boolean masks ((K, H, W) or a
                list of (H, W)), or SAM's automatic-mask output, painted smallest area first with ids 1..K
                (docs/masks.md); None lets the method's mask generator run. A list with one entry per image for
                a batch.
        """
        batch, images = self._images(image)
        labelset = parse_labels(labels)
        head = Head(self.cfg.logit_scale, self._threshold(threshold), self.cfg.area_threshold)
        masks = self._masks(masks, batch, len(images))
        results = []
        with torch.inference_mode():
            contexts, logits = self._infer(images, labelset, progress, masks)
            for ctx, lg in zip(contexts, logits):
                out = self._finish(ctx, lg, labelset, head, return_logits=return_logits, return_probs=return_probs,
                                   progress=progress)
                results.append(SegmentationResult(
                    label_map=out["labels"].numpy().astype(np.int32), labels=list(labelset.names),
                    score=out["score"].numpy(), probs=None if out["probs"] is None else out["probs"].numpy(),
                    image=ctx.rgb, logits=None if out["logits"] is None else out["logits"].numpy(),
                    queries=list(labelset.queries)))
        return results if batch else results[0]

    def predict_logits(self, image: Any, labels: Union[LabelSet, Sequence], *, masks: Any = None
                       ) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Per-query cosine logits (Q, H, W) float32 at the input's size (after PAMR when enabled), on the model's
        device — the tensor path for research and evaluation."""
        batch, images = self._images(image)
        labelset = parse_labels(labels)
        with torch.inference_mode():
            contexts, logits = self._infer(images, labelset, False, self._masks(masks, batch, len(images)))
            out = [self._band_logits(ctx, lg, 0, ctx.size[0]) for ctx, lg in zip(contexts, logits)]
        return out if batch else out[0]

    def predict_label_map(self, image: Any, labels: Union[LabelSet, Sequence], *, threshold: Optional[float] = None,
                          masks: Any = None) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Label maps (H, W) int64 on the model's device, with the full head and the strategy's refinement, and
        nothing else kept: what evaluation needs."""
        batch, images = self._images(image)
        labelset = parse_labels(labels)
        head = Head(self.cfg.logit_scale, self._threshold(threshold), self.cfg.area_threshold)
        with torch.inference_mode():
            contexts, logits = self._infer(images, labelset, False, self._masks(masks, batch, len(images)))
            out = [self._finish(ctx, lg, labelset, head, on_device=True)["labels"]
                   for ctx, lg in zip(contexts, logits)]
        return out if batch else out[0]

