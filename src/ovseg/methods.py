"""Method presets with their papers' inference settings (docs/methods.md).

==========  ===========  ========  ====  =========  ==============  ==========================
method      attention    residual  FFN   VFM        window/stride   extras
==========  ===========  ========  ====  =========  ==============  ==========================
clip        vanilla      yes       yes   -          224/112         plain CLIP dense tokens
maskclip    maskclip     yes       yes   -          224/112         values only (ECCV'22)
sclip       qq_kk        yes       yes   -          224/112         SCLIP (ECCV'24)
clearclip   qq           no        no    -          224/112         ClearCLIP (ECCV'24)
naclip      gaussian_kk  no        no    -          224/112         σ=5, PAMR 10 steps d=(8,16)
proxyclip   proxy        no        no    dino_b8    336/112         β=1.2 γ=3.0, pad to 56
==========  ===========  ========  ====  =========  ==============  ==========================

All: images resized to a 336 short side (long side ≤ 2048), logit scale 40, 80 OpenAI ImageNet templates.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from ._registry import Registry, suggest
from .attention import get_attention
from .sliding import as_pair

__all__ = ["MethodCfg", "METHODS", "get_method", "list_methods", "register_method"]

Pair = Tuple[int, int]


@dataclass(frozen=True)
class MethodCfg:
    """Every inference setting of a method. Build variants with :meth:`replace` (validated)."""

    name: str
    attention: str
    residual: bool
    ffn: bool
    vfm: Optional[str] = None
    clip: str = "ViT-B-16"
    clip_weights: str = "openai"
    window: Optional[Pair] = (224, 224)  # None = whole image
    stride: Optional[Pair] = (112, 112)
    pad_multiple: Optional[int] = None
    short_side: Optional[int] = 336  # None = keep the input size
    long_max: int = 2048
    logit_scale: float = 40.0
    threshold: float = 0.0
    pamr_steps: int = 0
    pamr_dilations: Tuple[int, ...] = (8, 16)
    beta: float = 1.2
    gamma: float = 3.0
    keep_diagonal: bool = True
    sigma: float = 5.0
    templates: Union[str, Tuple[str, ...]] = "openai_imagenet"
    batch_size: int = 8
    description: str = field(default="", compare=False)

    def replace(self, **changes: Any) -> "MethodCfg":
        """A copy with ``changes``; ``None`` values mean "keep the preset's value". Raises on unknown keys
        or invalid values. ``window=0`` (or ``"whole"``) selects whole-image inference; ``short_side=0`` keeps the
        input size; ``pad_multiple=0`` disables padding."""
        names = [f.name for f in dataclasses.fields(self) if f.name not in ("name", "description")]
        clean = {}
        for key, value in changes.items():
            if key not in names:
                raise TypeError(f"unknown option '{key}' for method '{self.name}';{suggest(key, names)} "
                                f"options: {', '.join(names)}")
            if value is not None:
                clean[key] = value
        if clean.get("window") in (0, "whole"):
            clean["window"] = None
            clean.setdefault("stride", None)
        for key in ("short_side", "pad_multiple"):  # 0 switches the step off (None keeps the preset's value)
            if key in clean and clean[key] == 0 and not isinstance(clean[key], bool):
                clean[key] = None
        cfg = dataclasses.replace(self, **clean)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        window = as_pair(self.window, "window") if self.window is not None else None
        stride = as_pair(self.stride, "stride") if self.stride is not None else None
        if window is not None:
            stride = stride or window
            if stride[0] > window[0] or stride[1] > window[1]:
                raise ValueError(f"stride {stride} is larger than window {window}; pixels would be skipped")
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "pamr_dilations", tuple(self.pamr_dilations))
        if not isinstance(self.templates, str):
            object.__setattr__(self, "templates", tuple(self.templates))
        object.__setattr__(self, "stride", stride if window is not None else None)
        strategy = get_attention(self.attention)
        if strategy.uses_vfm and self.vfm is None:
            raise ValueError(f"attention '{self.attention}' needs a VFM; pass vfm=, e.g. vfm='dino_b8'")
        if not strategy.uses_vfm and self.vfm is not None:
            raise ValueError(
                f"method '{self.name}' (attention '{self.attention}') does not use a VFM, but vfm={self.vfm!r} "
                "was given; VFMs guide the 'proxy' attention of 'proxyclip'"
            )
        if not strategy.keeps_cls and self.residual:
            raise ValueError(f"attention '{self.attention}' changes the token grid; it needs residual=False")
        for key in ("logit_scale", "gamma", "sigma"):
            if not float(getattr(self, key)) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)!r}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")
        for key in ("pamr_steps",):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ValueError(f"{key} must be an int >= 0, got {getattr(self, key)!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.short_side is not None and (not isinstance(self.short_side, int) or self.short_side < 1):
            raise ValueError(f"short_side must be a positive int or None, got {self.short_side!r}")
        if self.pad_multiple is not None and (not isinstance(self.pad_multiple, int) or self.pad_multiple < 1):
            raise ValueError(f"pad_multiple must be a positive int or None, got {self.pad_multiple!r}")
        if any((not isinstance(d, int)) or d < 1 for d in self.pamr_dilations):
            raise ValueError(f"pamr_dilations must be positive ints, got {self.pamr_dilations!r}")

    def attention_params(self) -> Dict[str, Any]:
        """The keyword parameters this config passes to its attention strategy."""
        return {p: getattr(self, p) for p in get_attention(self.attention).params}


METHODS = Registry("method", "list_methods")


def register_method(cfg: MethodCfg, *, overwrite: bool = False) -> MethodCfg:
    cfg.validate()
    METHODS.register(cfg.name, cfg, doc=cfg.description, overwrite=overwrite)
    return cfg


def get_method(name: str) -> MethodCfg:
    return METHODS.get(name).obj


def list_methods() -> List[str]:
    """Names of the method presets."""
    return METHODS.names()


for _cfg in (
    MethodCfg("clip", "vanilla", residual=True, ffn=True,
              description="plain CLIP patch tokens (baseline)"),
    MethodCfg("maskclip", "maskclip", residual=True, ffn=True,
              description="MaskCLIP (Zhou et al., ECCV 2022): last-block value embeddings"),
    MethodCfg("sclip", "qq_kk", residual=True, ffn=True,
              description="SCLIP (Wang et al., ECCV 2024): correlative self-attention q-q + k-k"),
    MethodCfg("clearclip", "qq", residual=False, ffn=False,
              description="ClearCLIP (Lan et al., ECCV 2024): q-q attention, no residual, no FFN"),
    MethodCfg("naclip", "gaussian_kk", residual=False, ffn=False, pamr_steps=10,
              description="NACLIP (Hajimiri et al., WACV 2025): k-k + Gaussian window, reduced block, PAMR"),
    MethodCfg("proxyclip", "proxy", residual=False, ffn=False, vfm="dino_b8", window=(336, 336),
              pad_multiple=56, description="ProxyCLIP (Lan et al., ECCV 2024): VFM proxy attention"),
):
    register_method(_cfg)
