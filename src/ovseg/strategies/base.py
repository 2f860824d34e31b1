"""Dense strategies: the per-window computation of a method, as an ``nn.Module`` with declared parameters.

A strategy turns CLIP-normalised windows into dense features in CLIP's joint space. It reads the backbones
through the :class:`ovseg.model.DenseModel` it is part of (``model.clip``, ``model.vfms``), declares its options
(:class:`ovseg.params.Param`, defaults in one place) and the VFMs it needs, and may hook into three places of the
pipeline (see docs/architecture.md):

- :meth:`DenseStrategy.prepare` once per image before the windows (e.g. a whole-image pass);
- :meth:`DenseStrategy.forward` / :meth:`DenseStrategy.window_logits` per batch of windows;
- :meth:`DenseStrategy.postprocess` once per image on the full-resolution label map.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Type

import numpy as np
import torch
import torch.nn as nn

from .._registry import Registry
from ..errors import InvalidInputError, InvalidTypeError
from ..params import Param, check_options

if TYPE_CHECKING:  # pragma: no cover
    from ..model import DenseModel

__all__ = [
    "DenseStrategy", "ImageContext", "WindowContext", "STRATEGIES", "register_strategy", "get_strategy",
    "list_strategies", "cosine_logits",
]


def cosine_logits(feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Unit-norm features (N, E, h, w) and unit-norm queries (Q, E) -> cosine logits (N, Q, h, w)."""
    return torch.einsum("nehw,qe->nqhw", feats, text.to(feats.dtype))


@dataclass
class ImageContext:
    """What a strategy may know about one image beyond its windows.

    Attributes:
        index: position of the image in the ``predict`` call.
        x: the resized, CLIP-normalised image (3, H, W) float32 on the model's device.
        rgb: the input image as uint8 (H0, W0, 3) numpy, at its original size.
        masks: user-supplied region masks (an int label map (H0, W0)), if any.
        extra: what :meth:`DenseStrategy.prepare` stores for the windows and post-processing.
    """

    index: int
    x: torch.Tensor
    rgb: Optional[np.ndarray] = None
    masks: Optional[torch.Tensor] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> Tuple[int, int]:
        """The original (H0, W0)."""
        return tuple(self.rgb.shape[:2]) if self.rgb is not None else tuple(self.x.shape[-2:])


@dataclass
class WindowContext:
    """The context of one batch of windows.

    Attributes:
        text: unit-norm query embeddings (Q, E), when the caller has them (always in ``predict``).
        images: for each window of the batch, the :class:`ImageContext` of the image it was cut from.
        boxes: for each window, its (y1, y2, x1, x2) box in the resized image.
        pad: (left, right, top, bottom) zero padding applied to every window of the batch.
        aux: per-window crops of auxiliary per-image maps (e.g. region masks), each (N, C, h, w).
    """

    text: Optional[torch.Tensor] = None
    images: Sequence[ImageContext] = ()
    boxes: Sequence[Tuple[int, int, int, int]] = ()
    pad: Tuple[int, int, int, int] = (0, 0, 0, 0)
    aux: Dict[str, torch.Tensor] = field(default_factory=dict)


class DenseStrategy(nn.Module):
    """Base class of dense strategies.

    Subclasses set ``name``, ``doc`` and ``params`` (or override :meth:`declared_params` when the parameter set
    depends on other options), declare VFM roles in :meth:`vfm_roles`, and implement :meth:`forward`.
    ``self.options`` holds every declared option, validated, defaults filled in.
    """

    name: ClassVar[str] = ""
    doc: ClassVar[str] = ""
    params: ClassVar[Tuple[Param, ...]] = ()
    needs_text: ClassVar[bool] = False  # forward needs ``context.text`` (e.g. a second pass guided by labels)
    # In whole-image mode (``window=None``), the logits of a window ARE the image's logits on the strategy's own grid
    # (e.g. Trident's SAM grid): the predictor keeps them on that grid and resizes them straight to the input's size
    # (H0, W0) in post-processing, instead of first to the resized image. Windowed inference is unchanged.
    native_grid: ClassVar[bool] = False
    uses_masks: ClassVar[bool] = False  # reads region masks (``predict(..., masks=...)``, ``ImageContext.masks``)

    def __init__(self, **options: Any):
        super().__init__()
        self.options: Dict[str, Any] = self.check(options)

    # ------------------------------------------------------------------ declaration
    @classmethod
    def declared_params(cls, options: Mapping[str, Any]) -> Tuple[Param, ...]:
        """The parameters this strategy accepts given ``options`` (default: the fixed ``params``)."""
        return tuple(cls.params)

    @classmethod
    def check(cls, options: Mapping[str, Any], *, owner: Optional[str] = None,
              other_names: Sequence[str] = ()) -> Dict[str, Any]:
        """Validate options; return all declared values with defaults. Unknown keys raise with a suggestion."""
        return check_options(owner or f"strategy '{cls.name}'", cls.declared_params(options), options,
                             other_names=other_names)

    @classmethod
    def vfm_roles(cls, options: Mapping[str, Any]) -> Dict[str, Optional[str]]:
        """VFMs this strategy needs: role -> default VFM name (None: the user must choose one).

        The role ``"vfm"`` is the one ``Segmenter(vfm=...)`` selects. Default: no VFM.
        """
        return {}

    @classmethod
    def requirements(cls, options: Mapping[str, Any]) -> Tuple[Tuple[str, str, str], ...]:
        """Optional packages the strategy needs with these (resolved) options, as ``(module, extra, what)``;
        the predictor checks them before building anything (``ovseg._deps.require``). Default: none."""
        return ()

    def set_options(self, options: Mapping[str, Any]) -> None:
        """Replace the options (validated first, so a bad value leaves the strategy unchanged)."""
        self.options = self.check(options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

    def window_elements(self, model: "DenseModel", height: int, width: int) -> int:
        """Activation elements one (height x width) window needs beyond the backbones' widest tensors (kept
        intermediates, extra token streams), for ``Segmenter(memory_budget=...)``. Default: 0."""
        return 0

    # ------------------------------------------------------------------ hooks
    def setup(self, model: "DenseModel") -> None:
        """When the model is assembled, and again after the options changed (``Segmenter.configure``): build the
        parts that depend on the model's backbones (e.g. a decoder loaded from a VFM's release file)."""

    def batch_key(self, model: "DenseModel", image: ImageContext) -> Hashable:
        """Windows are only batched with windows of images with the same key (default: one key for all), for
        strategies whose per-image work fixes a shape (e.g. a grid that depends on the original size)."""
        return None

    def prepare(self, model: "DenseModel", image: ImageContext, text: Optional[torch.Tensor]) -> None:
        """Once per image before its windows; store what the windows need in ``image.extra``."""

    def forward(self, model: "DenseModel", crops: torch.Tensor, context: WindowContext) -> torch.Tensor:
        """Windows (N, 3, h, w), CLIP-normalised -> dense features (N, E, h', w') (not normalised)."""
        raise NotImplementedError

    def window_logits(self, model: "DenseModel", crops: torch.Tensor, text: torch.Tensor,
                      context: WindowContext) -> torch.Tensor:
        """Windows -> per-query cosine logits (N, Q, h', w'). Default: cosine of the unit-norm features."""
        return cosine_logits(model(crops, context=context), text)

    def postprocess(self, model: "DenseModel", label_map: torch.Tensor, image: ImageContext,
                    scores_at: Any = None) -> torch.Tensor:
        """Once per image on the full-resolution label map (H0, W0) int64; return the final map.

        ``scores_at(size)`` gives the class scores (C, h, w) at any size, for refinements that need them;
        ``scores_at(size, rows=(r0, r1))`` only rows [r0, r1) of them (C, r1 - r0, w), so that full-resolution work
        can go band by band.
        """
        return label_map


STRATEGIES = Registry("strategy", "list_strategies")


def register_strategy(cls: Type[DenseStrategy], *, overwrite: bool = False) -> Type[DenseStrategy]:
    """Register a :class:`DenseStrategy` subclass under its ``name`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, DenseStrategy)):
        raise InvalidTypeError(f"expected a DenseStrategy subclass, got {cls!r}")
    if not cls.name:
        raise InvalidInputError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    STRATEGIES.register(cls.name, cls, doc=cls.doc, overwrite=overwrite)
    return cls


def get_strategy(name: str) -> Type[DenseStrategy]:
    return STRATEGIES.get(name).obj


def list_strategies() -> List[str]:
    """Names of the registered dense strategies."""
    return STRATEGIES.names()
