"""timm ``VisionTransformer`` as a dense feature extractor (DINO, DINOv2, MAE): last block + final norm,
prefix tokens (CLS, registers) dropped, positional embeddings resized with the family's own rule."""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import InvalidInputError
from ..pos_embed import resize_pos_embed
from ..weights import WeightsUnavailableError, load_state_dict_file, seeded
from .base import VFM
from .hooks import Collect, Intermediates, timm_block_forward

logger = logging.getLogger(__name__)

__all__ = ["TimmViTFeatures", "build_timm_vit", "create_timm_model", "offline_error", "load_into"]


class TimmViTFeatures(VFM):
    """A timm ViT with learned absolute positions; ``pos_mode`` picks the resize rule (see ``resize_pos_embed``)."""

    def __init__(self, vit: nn.Module, *, name: str = "vit", pos_mode: str = "legacy",
                 mean: Optional[Tuple[float, ...]] = None, std: Optional[Tuple[float, ...]] = None):
        super().__init__()
        if getattr(vit, "pos_embed", None) is None or getattr(vit, "cls_token", None) is None:
            raise ValueError(f"{name}: expected a ViT with a CLS token and learned position embeddings")
        self.vit = vit
        self.name = name
        self.pos_mode = pos_mode
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = int(vit.embed_dim)
        self.base_grid: Tuple[int, int] = tuple(vit.patch_embed.grid_size)
        self.num_prefix = int(vit.num_prefix_tokens)
        if mean is not None:
            self.mean = tuple(mean)
        if std is not None:
            self.std = tuple(std)

    @property
    def num_blocks(self) -> int:
        return len(self.vit.blocks)

    def forward_intermediates(self, x: torch.Tensor, collect: Optional[Collect] = None) -> Intermediates:
        """All blocks and the final norm, collecting what ``collect`` names (see :mod:`ovseg.backbones.hooks`).

        x: (B, 3, H, W) normalised with ``mean``/``std``. Returns :class:`Intermediates` whose ``x`` is the final
        normed sequence (B, prefix + h·w, C) and ``grid`` is (h, w); collected tokens and q/k/v include the prefix
        tokens (CLS first, then registers).
        """
        collect = (collect or Collect()).resolved(self.num_blocks, owner=f"VFM '{self.name}'")
        vit = self.vit
        p = self.patch_size
        x = x[..., : x.shape[-2] // p * p, : x.shape[-1] // p * p]  # the conv stem floors
        x = vit.patch_embed(x)  # (B, h, w, C): built with dynamic_img_size
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        pos = vit.pos_embed[0]  # (1 + N0, C), or (N0, C) when the prefix tokens carry no position
        if vit.no_embed_class:
            x = x + resize_pos_embed(pos, self.base_grid, (h, w), self.pos_mode).to(x.dtype)
            prefix = [vit.cls_token.expand(b, -1, -1)]
            if vit.reg_token is not None:
                prefix.append(vit.reg_token.expand(b, -1, -1))
            x = torch.cat([t.to(x.dtype) for t in prefix] + [x], dim=1)
        else:
            if self.num_prefix != 1:
                raise InvalidInputError(f"{self.name}: prefix tokens other than CLS need no_embed_class")
            pos = torch.cat([pos[:1], resize_pos_embed(pos[1:], self.base_grid, (h, w), self.pos_mode)], dim=0)
            x = torch.cat([vit.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1) + pos.to(x.dtype)
        x = vit.norm_pre(vit.pos_drop(x))
        out = Intermediates(x, (h, w))
        if not collect:
            x = vit.blocks(x)
        else:
            for i, blk in enumerate(vit.blocks):
                if i in collect.qkv or i in collect.attn:
                    x, qkv, attn = timm_block_forward(blk, x, want_qkv=i in collect.qkv, want_attn=i in collect.attn)
                    if qkv is not None:
                        out.qkv[i] = qkv
                    if attn is not None:
                        out.attn[i] = attn
                else:
                    x = blk(x)
                if i in collect.tokens:
                    out.tokens[i] = x
        out.x = vit.norm(x)
        return out

    def tokens_to_map(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """(B, prefix + h·w, C) -> (B, C, h, w), prefix tokens dropped."""
        b, _, c = x.shape
        return x[:, self.num_prefix:].transpose(1, 2).reshape(b, c, grid[0], grid[1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) normalised with ``mean``/``std`` -> (B, C, H/p, W/p)."""
        out = self.forward_intermediates(x)
        return self.tokens_to_map(out.x, out.grid)


def offline_error(vfm_name: str, source: str, release_file: str, release_url: str, exc: BaseException):
    return WeightsUnavailableError(
        f"could not load the weights of VFM '{vfm_name}' ({source}, {type(exc).__name__}). Download "
        f"{release_file} from {release_url} on a connected machine and pass its local path with "
        f"vfm_weights=PATH (CLI: --vfm-weights PATH)."
    )


def load_into(model: nn.Module, sd: Dict[str, torch.Tensor], weights: Any, vfm_name: str, release_file: str) -> None:
    """Strict-in-spirit load: any missing or unexpected key (or shape mismatch) is a clear ValueError."""
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ValueError(f"vfm_weights '{weights}' does not fit VFM '{vfm_name}': "
                         f"{str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ValueError(
            f"vfm_weights '{weights}' does not fit VFM '{vfm_name}': {len(missing)} missing keys "
            f"(e.g. {list(missing)[:3]}), {len(unexpected)} unexpected (e.g. {list(unexpected)[:3]}); expected "
            f"the official {release_file}"
        )
    logger.info("loaded %s weights from %s", vfm_name, weights)


def create_timm_model(
    *,
    timm_name: str,
    release_file: str,
    release_url: str,
    weights: Any = None,
    seed: int = 0,
    kwargs: Optional[Dict[str, Any]] = None,
    vfm_name: str = "vfm",
    convert: Optional[Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]] = None,
) -> nn.Module:
    """A timm model with the official weights (``None``, through timm's hub cache), ``"random"`` (seeded) ones,
    or a local release file whose keys ``convert`` maps to timm's."""
    import timm

    kwargs = dict(kwargs or {})
    if weights is None:
        try:
            return timm.create_model(timm_name, pretrained=True, **kwargs)
        except Exception as e:
            raise offline_error(vfm_name, f"timm '{timm_name}'", release_file, release_url, e) from None
    if not (isinstance(weights, str) and weights == "random") and not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"vfm_weights must be None, 'random' or a path, got {type(weights).__name__}")
    with seeded(seed):
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
    if not (isinstance(weights, str) and weights == "random"):
        sd = load_state_dict_file(weights, option="vfm_weights")
        load_into(model, convert(sd, model) if convert is not None else sd, weights, vfm_name, release_file)
    return model


def build_timm_vit(
    *,
    timm_name: str,
    release_file: str,
    release_url: str,
    weights: Any = None,
    seed: int = 0,
    model_kwargs: Optional[Dict[str, Any]] = None,
    vfm_name: str = "vfm",
    pos_mode: str = "legacy",
    convert: Optional[Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]] = None,
) -> TimmViTFeatures:
    """DINO / DINOv2 / MAE: a timm ViT (dynamic image size) wrapped as a dense feature extractor."""
    kwargs = dict(num_classes=0, dynamic_img_size=True)
    kwargs.update(model_kwargs or {})
    vit = create_timm_model(timm_name=timm_name, release_file=release_file, release_url=release_url,
                            weights=weights, seed=seed, kwargs=kwargs, vfm_name=vfm_name, convert=convert)
    return TimmViTFeatures(vit, name=vfm_name, pos_mode=pos_mode)
