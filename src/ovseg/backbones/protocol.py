"""What ovseg needs from a CLIP, so that a CLIP which is not an open_clip model can be registered.

:class:`CLIPBackbone` lists the attributes and methods the strategies and the predictor use. ovseg's
:class:`~ovseg.backbones.CLIPAdapter` implements it over open_clip; :func:`register_clip` adds a builder for
another implementation under an architecture name, which ``Segmenter(clip=name)`` then builds.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

from .._registry import Registry
from ..errors import InvalidTypeError
from .hooks import Collect, Intermediates

__all__ = ["CLIPBackbone", "CLIPS", "register_clip", "build_clip", "list_registered_clips"]


@runtime_checkable
class CLIPBackbone(Protocol):
    """The CLIP interface.

    Attributes:
        arch: architecture name; weights: what the weights are (tag, path or ``"random"``).
        patch_size: (ph, pw) stride of the patch embedding; base_grid: the checkpoint's token grid.
        width: token width D; num_heads: heads of the attention; num_blocks: transformer blocks L;
        embed_dim: dimension E of the joint image-text space.
    """

    arch: str
    weights: Any
    patch_size: Tuple[int, int]
    base_grid: Tuple[int, int]
    width: int
    num_heads: int
    num_blocks: int
    embed_dim: int

    def grid_size(self, height: int, width: int) -> Tuple[int, int]:
        """Token grid (gh, gw) of an input of this size."""

    def forward_intermediates(self, x: torch.Tensor, collect: Optional[Collect] = None) -> Intermediates:
        """Blocks 0..L−2 on CLIP-normalised (B, 3, H, W); ``.x`` is the last block's input (B, 1+N, D)."""

    def forward_dense(self, x: torch.Tensor, strategy: Any, *, residual: bool = True, ffn: bool = True,
                      vfm_feats: Optional[torch.Tensor] = None, **params: Any) -> torch.Tensor:
        """Dense features (B, E, h, w) with ``strategy`` (an attention strategy) in the last block."""

    def qkv(self, i: int, y: torch.Tensor, needs: str = "qkv") -> Tuple[Optional[torch.Tensor], ...]:
        """Block ``i``'s per-head q, k, v (B, nh, T, hd) from its normalised input."""

    def attn_out(self, i: int, o: torch.Tensor) -> torch.Tensor:
        """Block ``i``'s output projection of per-head outputs (B, nh, T, hd) -> (B, T, D)."""

    def ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``i``'s FFN branch without its residual."""

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and projection of every token: (B, T, D) -> (B, T, E)."""

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Prompts -> token ids (N, context)."""

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> text embeddings (N, E), not normalised."""


CLIPS = Registry("CLIP architecture", "backbones.list_registered_clips")


def register_clip(name: str, builder: Optional[Callable[..., torch.nn.Module]] = None, *, doc: str = "",
                  requires: Sequence[Tuple[str, str]] = (), overwrite: bool = False, **defaults: Any):
    """Register a CLIP builder under an architecture name (usable as a decorator).

    The builder is called as ``builder(weights=..., seed=..., model_kwargs=..., **defaults)`` and must return an
    ``nn.Module`` implementing :class:`CLIPBackbone`.
    """
    return CLIPS.register(name, builder, doc=doc, requires=requires, overwrite=overwrite, **defaults)


def list_registered_clips() -> List[str]:
    """CLIP architectures registered with :func:`register_clip` (open_clip's own are always available)."""
    return CLIPS.names()


def build_clip(arch: str, weights: Any = "openai", *, tag: Optional[str] = None, seed: int = 0,
               model_kwargs: Optional[Dict[str, Any]] = None) -> torch.nn.Module:
    """A registered CLIP architecture, else an open_clip one (:func:`ovseg.backbones.create_clip`; ``tag`` names
    the pretrained tag a local file holds)."""
    if isinstance(arch, str) and arch in CLIPS:
        model = CLIPS.create(arch, weights=weights, seed=seed, model_kwargs=model_kwargs)
        missing = [a for a in ("arch", "weights", "patch_size", "embed_dim", "forward_intermediates",
                               "forward_dense", "project", "tokenize", "encode_text", "grid_size")
                   if not hasattr(model, a)]
        if missing:
            raise InvalidTypeError(f"CLIP builder '{arch}' returned {type(model).__name__} without "
                                   f"{', '.join(missing)} (see ovseg.backbones.CLIPBackbone)")
        return model.eval().requires_grad_(False)
    from .clip import create_clip

    return create_clip(arch, weights, tag=tag, device="cpu", seed=seed, model_kwargs=model_kwargs)
