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

A :class:`MethodCfg` holds the *pipeline* options (resize, windows, head, PAMR, templates) as fields and the
*strategy* options as a mapping of what the preset sets explicitly; every other strategy option takes the default
its strategy declares (:mod:`ovseg.params`), so defaults live in one place.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type, Union

from ._registry import Registry
from .errors import InvalidInputError
from .params import Param, check_options, non_negative_int, positive, positive_int, unit_interval
from .sliding import as_pair
from .strategies import DenseStrategy, get_strategy

__all__ = ["MethodCfg", "METHODS", "get_method", "list_methods", "register_method", "PIPELINE_PARAMS"]

Pair = Tuple[int, int]


def _pair_or_none(name: str, value: Any) -> Optional[Pair]:
    return as_pair(value, name)


def _dilations(name: str, value: Any) -> Tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise InvalidInputError(f"{name} must be a sequence of positive ints, got {value!r}")
    out = tuple(value)
    if not out or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in out):
        raise InvalidInputError(f"{name} must be positive ints, got {value!r}")
    return out


def _templates(name: str, value: Any) -> Union[str, Tuple[str, ...]]:
    from .text import check_templates

    return check_templates(value)  # unknown names and strings without '{}' raise


def _vfm_name(name: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    from .backbones import VFMS

    VFMS.get(value)  # unknown names raise with a did-you-mean suggestion
    return value


def _vfm_map(name: str, value: Any) -> Dict[str, str]:
    if not isinstance(value, Mapping):
        raise InvalidInputError(f"{name} must map VFM roles to VFM names, got {value!r}")
    return {str(k): _vfm_name(name, v) for k, v in value.items()}


def _off_if_zero(check):
    """0 (or None) switches a step off (short_side=0 keeps the input size, pad_multiple=0 disables padding)."""

    def wrapped(name: str, value: Any) -> Any:
        if value is None or (not isinstance(value, bool) and value == 0):
            return None
        return check(name, value)

    return wrapped


# Options of the shared pipeline, checked the same way as strategy options (their defaults are MethodCfg's).
PIPELINE_PARAMS: Tuple[Param, ...] = (
    Param("clip", "ViT-B-16", "open_clip architecture"),
    Param("clip_weights", "openai", "open_clip pretrained tag, local checkpoint or 'random'"),
    Param("vfm", None, "VFM of the method's 'vfm' role (see ovseg.list_vfms())", _vfm_name),
    Param("vfms", {}, "VFMs of further roles, e.g. {'sam': 'sam_b16'}", _vfm_map),
    Param("window", (224, 224), "window (h, w) or int; 0 = whole image", _pair_or_none),
    Param("stride", (112, 112), "stride between windows", _pair_or_none),
    Param("pad_multiple", None, "pad each window to a multiple of this (0 = off)", _off_if_zero(positive_int)),
    Param("short_side", 336, "resize the short side to this (0 = keep the input size)", _off_if_zero(positive_int)),
    Param("long_max", 2048, "the long side never exceeds this after resizing", positive_int),
    Param("logit_scale", 40.0, "softmax temperature over the queries", positive),
    Param("threshold", 0.0, "pixels whose best class score is below it go to class 0", unit_interval),
    Param("area_threshold", 0.0, "drop classes >= 1 covering at most this share of the non-background argmax",
          unit_interval),
    Param("pamr_steps", 0, "PAMR iterations (0 = off)", non_negative_int),
    Param("pamr_dilations", (8, 16), "PAMR neighbourhood dilations", _dilations),
    Param("templates", "openai_imagenet", "prompt templates: a named set or a list of strings with '{}'",
          _templates),
    Param("batch_size", 8, "windows per forward pass", positive_int),
)
_PIPELINE = {p.name: p for p in PIPELINE_PARAMS}


@dataclass(frozen=True)
class MethodCfg:
    """Every inference setting of a method. Build variants with :meth:`replace` (validated).

    Strategy options (``attention``, ``sigma``, ``beta``, ...) are read as attributes too (``cfg.sigma``), with the
    strategy's declared defaults for those the preset does not set.
    """

    name: str
    strategy: str = "last_block"
    options: Mapping[str, Any] = field(default_factory=dict)  # strategy options the preset sets explicitly
    vfm: Optional[str] = None
    vfms: Mapping[str, str] = field(default_factory=dict)
    clip: str = "ViT-B-16"
    clip_weights: str = "openai"
    window: Optional[Pair] = (224, 224)  # None = whole image
    stride: Optional[Pair] = (112, 112)
    pad_multiple: Optional[int] = None
    short_side: Optional[int] = 336  # None = keep the input size
    long_max: int = 2048
    logit_scale: float = 40.0
    threshold: float = 0.0
    area_threshold: float = 0.0
    pamr_steps: int = 0
    pamr_dilations: Tuple[int, ...] = (8, 16)
    templates: Union[str, Tuple[str, ...]] = "openai_imagenet"
    batch_size: int = 8
    description: str = field(default="", compare=False)

    # ------------------------------------------------------------------ strategy options
    @property
    def strategy_cls(self) -> Type[DenseStrategy]:
        return get_strategy(self.strategy)

    @property
    def strategy_options(self) -> Dict[str, Any]:
        """Every option of the strategy: the preset's and the user's values, the strategy's defaults for the rest."""
        return self.strategy_cls.check(dict(self.options), owner=f"method '{self.name}'",
                                       other_names=_PIPELINE)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_") or key in ("name", "strategy", "options"):
            raise AttributeError(key)
        opts = self.strategy_options
        if key in opts:
            return opts[key]
        raise AttributeError(f"method '{self.name}' has no option '{key}'")

    def option_names(self) -> List[str]:
        """The names ``replace``/``Segmenter(**options)`` accept for this method."""
        return sorted(set(_PIPELINE) | set(self.strategy_options))

    # ------------------------------------------------------------------ variants
    def replace(self, **changes: Any) -> "MethodCfg":
        """A copy with ``changes``; ``None`` values mean "keep the preset's value". Pipeline options and the
        strategy's options may be mixed. Raises on unknown keys (with a did-you-mean suggestion) or invalid values.
        ``window=0`` (or ``"whole"``) selects whole-image inference; ``short_side=0`` keeps the input size;
        ``pad_multiple=0`` disables padding."""
        changes = {k: v for k, v in changes.items() if v is not None}
        strategy = changes.pop("strategy", self.strategy)
        pipeline: Dict[str, Any] = {}
        options = dict(self.options) if strategy == self.strategy else {}
        for key, value in changes.items():
            if key in _PIPELINE:
                pipeline[key] = value
            else:
                options[key] = value
        if pipeline.get("window") in (0, "whole"):
            pipeline["window"] = None
            pipeline.setdefault("stride", None)
        for key in ("short_side", "pad_multiple"):
            if key in pipeline and not isinstance(pipeline[key], bool) and pipeline[key] == 0:
                pipeline[key] = None
        cfg = dataclasses.replace(self, strategy=strategy, options=options, **pipeline)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every value (normalising pairs and tuples in place); raise naming the bad one."""
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in _PIPELINE}
        if given["window"] is None:
            given.pop("window")  # whole image
        checked = check_options(f"method '{self.name}'", PIPELINE_PARAMS, given)
        window = checked["window"] if self.window is not None else None
        stride = checked["stride"] if window is not None else None
        if window is not None:
            stride = stride or window
            if stride[0] > window[0] or stride[1] > window[1]:
                raise InvalidInputError(f"stride {stride} is larger than window {window}; pixels would be skipped")
        for key, value in checked.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "options", dict(self.options))
        options = self.strategy_options  # validates the strategy's options
        roles = self.strategy_cls.vfm_roles(options)
        if "vfm" in roles and self.vfm is None and roles["vfm"] is None:
            raise InvalidInputError(f"method '{self.name}' needs a VFM; pass vfm=, e.g. vfm='dino_b8'")
        if "vfm" not in roles and self.vfm is not None:
            raise InvalidInputError(
                f"method '{self.name}' does not use a VFM, but vfm={self.vfm!r} was given; VFMs guide "
                "'proxyclip' (the 'proxy' attention) and the 2025 methods that name one")
        unknown = sorted(set(self.vfms) - set(roles))
        if unknown:
            raise InvalidInputError(f"method '{self.name}' has no VFM role {unknown[0]!r}; "
                                    f"its roles: {', '.join(sorted(roles)) or 'none'}")

    def vfm_names(self) -> Dict[str, str]:
        """The VFM of every role: the user's or the preset's choice, else the strategy's default."""
        roles = self.strategy_cls.vfm_roles(self.strategy_options)
        out = {}
        for role, default in roles.items():
            name = self.vfm if role == "vfm" else self.vfms.get(role)
            out[role] = name if name is not None else default
        return {r: n for r, n in out.items() if n is not None}

    def attention_params(self) -> Dict[str, Any]:
        """The keyword parameters of the last-block attention (strategy ``last_block`` only)."""
        from .attention import get_attention

        opts = self.strategy_options
        return {p.name: opts[p.name] for p in get_attention(opts["attention"]).params}

    def as_dict(self) -> Dict[str, Any]:
        """Every setting, JSON-friendly (tuples as lists), strategy options resolved."""
        out: Dict[str, Any] = {"name": self.name, "strategy": self.strategy}
        for f in dataclasses.fields(self):
            if f.name in _PIPELINE:
                v = getattr(self, f.name)
                out[f.name] = list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, Mapping) else v)
        out["options"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.strategy_options.items()}
        return out


METHODS = Registry("method", "list_methods")


def register_method(cfg: MethodCfg, *, overwrite: bool = False) -> MethodCfg:
    """Add a preset (validated) so that ``Segmenter(cfg.name)`` builds it."""
    cfg.validate()
    METHODS.register(cfg.name, cfg, doc=cfg.description, overwrite=overwrite)
    return cfg


def get_method(name: str) -> MethodCfg:
    return METHODS.get(name).obj


def list_methods() -> List[str]:
    """Names of the method presets."""
    return METHODS.names()


def _last_block(name: str, attention: str, residual: bool, ffn: bool, description: str, **pipeline: Any) -> MethodCfg:
    options = {"attention": attention}
    if not residual:
        options["residual"] = False
    if not ffn:
        options["ffn"] = False
    return MethodCfg(name, "last_block", options, description=description, **pipeline)


for _cfg in (
    _last_block("clip", "vanilla", True, True, "plain CLIP patch tokens (baseline)"),
    _last_block("maskclip", "maskclip", True, True, "MaskCLIP (Zhou et al., ECCV 2022): last-block value embeddings"),
    _last_block("sclip", "qq_kk", True, True,
                "SCLIP (Wang et al., ECCV 2024): correlative self-attention q-q + k-k"),
    _last_block("clearclip", "qq", False, False,
                "ClearCLIP (Lan et al., ECCV 2024): q-q attention, no residual, no FFN"),
    _last_block("naclip", "gaussian_kk", False, False,
                "NACLIP (Hajimiri et al., WACV 2025): k-k + Gaussian window, reduced block, PAMR", pamr_steps=10),
    _last_block("proxyclip", "proxy", False, False, "ProxyCLIP (Lan et al., ECCV 2024): VFM proxy attention",
                vfm="dino_b8", window=(336, 336), pad_multiple=56),
):
    register_method(_cfg)


# ---- Trident (ICCV 2025): whole-image mode (one "window" per image: the strategy cuts its own 336 sub-images);
# the official evaluation defaults (configs/base_config.py, --sam_refine) are the strategy's declared defaults
for _cfg in (
    MethodCfg("trident", "trident", vfm="dino_b16", vfms={"sam": "sam_b16"}, window=None, stride=None,
              short_side=448, batch_size=1,
              description="Trident (Shi et al., ICCV 2025): CLIP + DINO sub-images spliced, SAM correlation, "
                          "SAM refinement"),
    MethodCfg("trident_l14", "trident", vfm="dino_b16", vfms={"sam": "sam_b16"}, clip="ViT-L-14",
              clip_weights="openai", window=None, stride=None, short_side=448, batch_size=1,
              description="Trident with CLIP ViT-L/14 (OpenAI; the official code ships no L/14 setting)"),
    MethodCfg("trident_h14", "trident", vfm="dino_b16", vfms={"sam": "sam_b16"}, clip="ViT-H-14",
              clip_weights="laion2b_s32b_b79k", window=None, stride=None, short_side=448, batch_size=1,
              description="Trident with OpenCLIP ViT-H/14 (LAION-2B)"),
):
    register_method(_cfg)


# CorrCLIP (Zhang et al., ICCV 2025): the official v1 code's defaults (docs/methods.md, "CorrCLIP"); the strategy
# declares tau, eps, alpha, beta and the mask generator (SAM 2.0 Hiera-L, 8x8 points)
for _cfg in (
    MethodCfg("corrclip", "corrclip", vfm="dino_b8", clip="ViT-B-16-quickgelu", clip_weights="metaclip_fullcc",
              window=(336, 336), stride=(112, 112), pad_multiple=56,
              description="CorrCLIP (Zhang et al., ICCV 2025): region-scoped DINO correlations, spatial and "
                          "semantic branches, region vote; MetaCLIP ViT-B/16, DINO-B/8, SAM 2 masks"),
    MethodCfg("corrclip_l14", "corrclip", vfm="dino_b8", clip="ViT-L-14-quickgelu", clip_weights="metaclip_fullcc",
              window=(336, 336), stride=(112, 112), pad_multiple=56,
              description="CorrCLIP with MetaCLIP ViT-L/14 (the paper's large setting)"),
):
    register_method(_cfg)


# SC-CLIP and ResCLIP (issue 12): CLIP-only 2025 methods with their own dense strategies (docs/methods.md).
for _cfg in (
    MethodCfg("scclip", "scclip", description="SC-CLIP (Bai et al., TIP 2025): anomaly repair, similarity-guided "
              "last block and multi-level fusion (OpenAI ViT-B/16, 224/112 windows)"),
    MethodCfg("resclip", "resclip", description="ResCLIP (Yang et al., CVPR 2025) on NACLIP: residual "
              "cross-correlation attention + semantic feedback refinement"),
    MethodCfg("resclip_sclip", "resclip", {"base": "sclip"},
              description="ResCLIP (CVPR 2025) on SCLIP's last block (residual and FFN kept)"),
    MethodCfg("resclip_clearclip", "resclip", {"base": "clearclip"},
              description="ResCLIP (CVPR 2025) on ClearCLIP's last block"),
):
    register_method(_cfg)

# CASS (CVPR 2025): the official default backbone pair (CLIP ViT-B/16 OpenAI, DINO ViT-B/8), 224/112 windows on a
# 336 short side, the prior's weights of its PASCAL Context configs (the bare official constructor turns it off)
register_method(MethodCfg(
    "cass", "cass",
    {"beta": 0.25, "alpha": 0.04, "h_threshold": 0.09, "eigenscaling": True},
    vfm="dino_b8",
    description="CASS (Kim et al., CVPR 2025): DINO's low-rank attention graph in CLIP's last block, "
                "object-presence prior",
))
