"""Segmenter: one object for every method — builds CLIP (+ VFM), caches text embeddings, predicts label maps."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ._validate import as_probability
from .attention import get_attention
from .backbones import create_clip, create_vfm
from .config import CLIP_MEAN, CLIP_STD, PRECISIONS
from .methods import MethodCfg, get_method
from .preprocess import is_batch, load_image, normalize_clip, rescale_size, resize_image
from .result import SegmentationResult
from .sliding import slide_inference, window_grid
from .text import LabelSet, TextClassifier, get_templates, parse_labels
from .tiling import pamr_rows, resize_rows, row_bands

logger = logging.getLogger(__name__)

__all__ = ["Segmenter", "postprocess"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def postprocess(
    logits: torch.Tensor,
    query_class: Sequence[int],
    num_classes: int,
    *,
    logit_scale: float = 40.0,
    threshold: float = 0.0,
):
    """Cosine logits (Q, H, W) -> (label map (H, W) int64, class scores (C, H, W)) as the references do
    (docs/methods.md, "Post-processing").

    Softmax over all queries of ``logits · logit_scale``; a class scores the max over its synonyms; argmax
    (ties to the lowest index); pixels whose best class score is below ``threshold`` go to class 0.
    The returned scores are *not* renormalised (they are what the threshold sees).
    """
    probs = torch.softmax(logits.float() * logit_scale, dim=0)
    if len(query_class) != num_classes:
        index = torch.as_tensor(query_class, device=logits.device).view(-1, 1, 1).expand_as(probs)
        scores = probs.new_zeros((num_classes,) + tuple(probs.shape[1:]))
        scores = scores.scatter_reduce(0, index, probs, reduce="amax", include_self=False)
    else:
        scores = probs
    best, labels = scores.max(dim=0)
    if threshold > 0:
        labels = torch.where(best < threshold, torch.zeros_like(labels), labels)
    return labels, scores


def _resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r} ({e}); use 'cpu', 'cuda', 'cuda:1', 'mps'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use device='cpu'")
    return dev


class Segmenter:
    """Training-free open-vocabulary semantic segmentation.

    Args:
        method: a preset from :func:`ovseg.list_methods` (``proxyclip``, ``naclip``, ``sclip``, ``clearclip``,
            ``maskclip``, ``clip``).
        clip: open_clip architecture (default ``ViT-B-16``).
        clip_weights: open_clip pretrained tag, local checkpoint path, or ``"random"`` (default ``openai``).
        vfm: VFM name for ``proxyclip`` (default ``dino_b8``); see :func:`ovseg.list_vfms`.
        vfm_weights: None (official weights), local checkpoint path, or ``"random"``.
        device: default CUDA when available, else CPU.
        precision: ``fp32``, ``fp16`` or ``bf16`` autocast (default fp32 on CPU, fp16 on CUDA).
        seed: seed for ``"random"`` weights.
        clip_kwargs: open_clip model-config overrides (e.g. a smaller ``vision_cfg`` for tests).
        vfm_kwargs: keyword options of the VFM builder, e.g. ``{"block": 1}`` for SD or
            ``{"model_kwargs": {...}}`` (architecture overrides for timm/diffusers).
        memory_budget: GB of activations for one batch of windows; the batch size then adapts to the window
            size (at most ``batch_size`` is ignored, at least 1). Default: a fixed ``batch_size``.
        compile: run the model forward through ``torch.compile`` (first calls per window shape compile).
        **options: any :class:`ovseg.methods.MethodCfg` field (window, stride, logit_scale, threshold, beta,
            gamma, sigma, pamr_steps, templates, attention, residual, ffn, batch_size, ...). ``None`` keeps the
            preset's value.
    """

    def __init__(
        self,
        method: str = "proxyclip",
        *,
        clip: Optional[str] = None,
        clip_weights: Optional[str] = None,
        vfm: Optional[str] = None,
        vfm_weights: Optional[str] = None,
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
            raise ValueError(f"memory_budget must be a positive number of GB, got {memory_budget!r}")
        if vfm_weights is not None and vfm is None and preset.vfm is None and "attention" not in options:
            raise ValueError(f"vfm_weights was given but method '{method}' uses no VFM")
        self.cfg: MethodCfg = preset.replace(clip=clip, clip_weights=clip_weights, vfm=vfm, **options)
        self.device = _resolve_device(device)
        if precision is None:
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.strategy = get_attention(self.cfg.attention)
        self.templates = get_templates(self.cfg.templates)
        self.clip = create_clip(self.cfg.clip, self.cfg.clip_weights, device=self.device, seed=seed,
                                model_kwargs=clip_kwargs)
        self.vfm = None
        if self.cfg.vfm is not None:
            self.vfm = create_vfm(self.cfg.vfm, vfm_weights, seed=seed, **(vfm_kwargs or {})).to(self.device)
        self.text = TextClassifier(self.clip)
        self.band_pixels = 1 << 21  # full-resolution post-processing works on bands of at most this many pixels
        self.memory_budget = memory_budget
        self._forward_impl = self._forward_features
        if compile:
            self._forward_impl = torch.compile(self._forward_features, dynamic=False)

    # ------------------------------------------------------------------ plumbing
    @property
    def method(self) -> str:
        return self.cfg.name

    def __repr__(self) -> str:
        vfm = f", vfm={self.cfg.vfm!r}" if self.cfg.vfm else ""
        return (f"Segmenter({self.cfg.name!r}, clip={self.cfg.clip!r}, clip_weights={self.clip.weights!r}{vfm}, "
                f"device='{self.device}', precision={self.precision!r})")

    def to(self, device: Union[str, torch.device]) -> "Segmenter":
        self.device = _resolve_device(device)
        self.clip.to(self.device)
        if self.vfm is not None:
            self.vfm.to(self.device)
        return self

    def configure(self, **options: Any) -> "Segmenter":
        """Change inference options (``window``, ``stride``, ``short_side``, ``threshold``, ``logit_scale``,
        ``pamr_steps``, ``templates``, ...) without reloading any model; ``window=0`` selects whole-image mode."""
        fixed = sorted({"clip", "clip_weights", "vfm"} & set(options))
        if fixed:
            raise ValueError(f"{', '.join(fixed)} cannot be changed by configure(); build a new Segmenter")
        self.cfg = self.cfg.replace(**options)
        self.strategy = get_attention(self.cfg.attention)
        self.templates = get_templates(self.cfg.templates)
        return self

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision])

    def text_embeddings(self, labels: Union[LabelSet, Sequence]) -> torch.Tensor:
        """(Q, E) unit-norm float32 query embeddings (cached)."""
        return self.text(parse_labels(labels).queries, self.templates, device=self.device)

    def _vfm_input(self, crops: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised crops -> the VFM's normalisation (docs/methods.md, "VFM input")."""
        dev = crops.device
        clip_mean = torch.tensor(CLIP_MEAN, device=dev).view(1, 3, 1, 1)
        clip_std = torch.tensor(CLIP_STD, device=dev).view(1, 3, 1, 1)
        mean = torch.tensor(self.vfm.mean, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(self.vfm.std, device=dev).view(1, 3, 1, 1)
        return (crops * clip_std + clip_mean - mean) / std

    def window_bytes(self, height: int, width: int) -> int:
        """Rough activation memory of one (height x width) window: the widest tensors of the CLIP and VFM
        blocks (q, k, v and the MLP hidden ~ 10 x tokens x width) and the proxy attention (3 x M²)."""
        itemsize = 4 if self.precision == "fp32" else 2
        gh, gw = self.clip.grid_size(height, width)
        total = 10 * (gh * gw + 1) * self.clip.width
        if self.vfm is not None:
            vh, vw = self.vfm.grid_size(height, width)
            total += 10 * vh * vw * int(getattr(self.vfm, "width", self.vfm.embed_dim)) + 3 * (vh * vw) ** 2
        return total * itemsize

    def batch_size_for(self, height: int, width: int) -> int:
        """Windows per forward pass for this window size (``memory_budget`` or the fixed ``batch_size``)."""
        if self.memory_budget is None:
            return self.cfg.batch_size
        return max(1, min(256, int(self.memory_budget * 2**30 // self.window_bytes(height, width))))

    def forward_features(self, crops: torch.Tensor) -> torch.Tensor:
        """Windows (N, 3, h, w), CLIP-normalised -> unit-norm dense features (N, E, h', w') float32."""
        return self._forward_impl(crops)

    def _forward_features(self, crops: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            vfm_feats = self.vfm.forward_features(self._vfm_input(crops)) if self.vfm is not None else None
            feats = self.clip.forward_dense(crops, self.strategy, residual=self.cfg.residual, ffn=self.cfg.ffn,
                                            vfm_feats=vfm_feats, **self.cfg.attention_params())
        return F.normalize(feats.float(), dim=1)

    def _window_logits(self, text: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(crops: torch.Tensor) -> torch.Tensor:
            feats = self.forward_features(crops)  # (N, E, h, w)
            return torch.einsum("nehw,qe->nqhw", feats, text)

        return fn

    # ------------------------------------------------------------------ inference
    def _prepare(self, src: Any):
        """One image -> (RGB for pictures: uint8 (H0, W0, 3) numpy, CLIP-normalised resized (3, H, W) tensor)."""
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
            raise ValueError(f"image of size {h0}x{w0} is too small or too elongated: resized to "
                             f"{size[0]}x{size[1]}, smaller than one {ph}x{pw} CLIP patch")
        x = normalize_clip(resize_image(img.to(self.device), size).float())
        if not isinstance(rgb, np.ndarray):
            rgb = (rgb * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        return rgb, x

    def _infer(self, images: Sequence[Any], labelset: LabelSet, progress: bool):
        """Window-averaged cosine logits (Q, H, W) at each image's resized resolution."""
        text = self.text(labelset.queries, self.templates, device=self.device)
        prepared = [self._prepare(src) for src in images]
        inputs = [x for _, x in prepared]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            total = sum(1 if self.cfg.window is None else
                        len(window_grid(x.shape[-2], x.shape[-1], self.cfg.window, self.cfg.stride)) for x in inputs)
            bar = tqdm(total=total, desc="windows", unit="win")
        batch = self.cfg.batch_size if self.memory_budget is None else self.batch_size_for
        logits = slide_inference(inputs, self._window_logits(text), window=self.cfg.window, stride=self.cfg.stride,
                                 pad_multiple=self.cfg.pad_multiple, batch_size=batch,
                                 progress=bar.update if bar is not None else None)
        if bar is not None:
            bar.close()
        return [(rgb, x, lg) for (rgb, x), lg in zip(prepared, logits)]

    def _finish(self, rgb: np.ndarray, x: torch.Tensor, lg: torch.Tensor, labelset: LabelSet, threshold: float,
                return_logits: bool) -> SegmentationResult:
        """Resize to the input size, PAMR, softmax/synonyms/argmax — one band of rows at a time (``ovseg.tiling``)."""
        h0, w0 = rgb.shape[:2]
        label_map = np.empty((h0, w0), dtype=np.int32)
        probs = np.empty((labelset.num_classes, h0, w0), dtype=np.float32)
        logits = np.empty((len(labelset.queries), h0, w0), dtype=np.float32) if return_logits else None
        pixels = self.band_pixels
        if self.cfg.pamr_steps > 0:  # PAMR bands carry steps·max(d) halo rows on each side: keep them <= 1/2 of it
            pixels = max(pixels, 4 * self.cfg.pamr_steps * max(self.cfg.pamr_dilations) * w0)
        for r0, r1 in row_bands(h0, w0, pixels):
            if self.cfg.pamr_steps > 0:
                band = pamr_rows(x, lg, (h0, w0), r0, r1, steps=self.cfg.pamr_steps, dilations=self.cfg.pamr_dilations)
            else:
                band = resize_rows(lg, (h0, w0), r0, r1)
            labels, scores = postprocess(band, labelset.query_class, labelset.num_classes,
                                         logit_scale=self.cfg.logit_scale, threshold=threshold)
            label_map[r0:r1] = labels.cpu().numpy()
            probs[:, r0:r1] = (scores / scores.sum(dim=0, keepdim=True)).cpu().numpy()
            if logits is not None:
                logits[:, r0:r1] = band.cpu().numpy()
        return SegmentationResult(label_map=label_map, probs=probs, labels=list(labelset.names), image=rgb,
                                  logits=logits, queries=list(labelset.queries))

    def predict(
        self,
        image: Any,
        labels: Union[LabelSet, Sequence],
        *,
        threshold: Optional[float] = None,
        return_logits: bool = False,
        progress: bool = False,
    ) -> Union[SegmentationResult, List[SegmentationResult]]:
        """Segment one image (path, PIL image, uint8 HxWx3 array, float (3, H, W) tensor in [0, 1]) or a list
        of them / a (B, 3, H, W) tensor (returns a list).

        Args:
            labels: list of class names; ``"sofa; couch"`` or ``["sofa", "couch"]`` gives synonyms.
            threshold: pixels whose best class probability is below it go to ``labels[0]`` (the references'
                ``prob_thd``; default: the method's, 0).
            return_logits: also keep the per-query cosine logits (Q, H, W) (after PAMR when enabled).
            progress: show a progress bar over windows.
        """
        batch = is_batch(image)
        images = list(image) if batch else [image]
        if not images:
            raise ValueError("no images given (empty list)")
        labelset = parse_labels(labels)
        thd = as_probability(self.cfg.threshold if threshold is None else threshold, "threshold")  # numpy/torch ok
        with torch.inference_mode():
            results = [self._finish(rgb, x, lg, labelset, float(thd), return_logits)
                       for rgb, x, lg in self._infer(images, labelset, progress)]
        return results if batch else results[0]
