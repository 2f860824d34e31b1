"""timm ``VisionTransformer`` as a dense feature extractor (DINO, DINOv2, MAE): last block + final norm,
prefix tokens (CLS, registers) dropped, positional embeddings resized with the family's own rule."""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import InvalidInputError
from ..pos_embed import resize_pos_embed
from ..weights import (
    check_constructor,
    downloading,
    fetch_hub_file,
    fetch_url,
    load_state_dict_file,
    parse_weights,
    seeded,
    strict_load,
)
from .base import VFM, VFMCfg
from .hooks import Collect, Intermediates, timm_block_forward, timm_block_qkv

logger = logging.getLogger(__name__)

__all__ = ["TimmViTFeatures", "build_timm_vit", "create_timm_model", "vfm_load_call"]


class TimmViTFeatures(VFM):
    """A timm ViT with learned absolute positions; ``pos_mode`` picks the resize rule (see ``resize_pos_embed``)."""

    def __init__(self, vit: nn.Module, *, name: str = "vit", pos_mode: str = "legacy",
                 mean: Optional[Tuple[float, ...]] = None, std: Optional[Tuple[float, ...]] = None):
        super().__init__()
        if getattr(vit, "pos_embed", None) is None or getattr(vit, "cls_token", None) is None:
            raise InvalidInputError(f"{name}: expected a ViT with a CLS token and learned position embeddings")
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
        tokens (CLS first, then registers). With ``collect.stop`` the forward ends at the last collected block and
        ``x`` is that block's input (no final norm).
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
        out = Intermediates(x, (h, w), embed=x if collect.embed else None)
        stop = collect.last if collect.stop else None
        if not collect:
            x = vit.blocks(x)
        else:
            for i, blk in enumerate(vit.blocks):
                if i == stop and i not in collect.tokens and i not in collect.attn:
                    out.qkv[i] = timm_block_qkv(blk, x)  # the block's q/k/v only: no attention, no MLP
                    out.x = x
                    return out
                x_in = x
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
                if i == stop:
                    out.x = x_in
                    return out
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


def vfm_load_call(vfm_name: str, path: str = "PATH") -> str:
    """The exact Python call and CLI flags that load a local release file of ``vfm_name``."""
    return (f'Segmenter("proxyclip", vfm="{vfm_name}", vfm_weights={path}) '
            f"(CLI: --vfm {vfm_name} --vfm-weights {path})")


def _hub_candidates(filename: Optional[str]) -> list:
    """The file names timm tries in a hub repo, safetensors first."""
    filename = filename or "pytorch_model.bin"
    if filename == "pytorch_model.bin":
        return ["model.safetensors", filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _fetch_official(timm_name: str, *, vfm_name: str, release_file: str, release_url: str) -> str:
    """Local path of timm's pretrained file for ``timm_name`` (hub cache or one fail-fast download)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        raise InvalidInputError(f"timm has no pretrained weights for '{timm_name}' (VFM '{vfm_name}')")
    with downloading(f"VFM '{vfm_name}' (timm '{timm_name}')", fetch=f"{release_file} from {release_url}",
                     load=vfm_load_call(vfm_name)):
        if cfg.file:
            return cfg.file
        if cfg.hf_hub_id:
            return fetch_hub_file(cfg.hf_hub_id, _hub_candidates(cfg.hf_hub_filename))
        if cfg.url:
            return fetch_url(cfg.url)
    raise InvalidInputError(f"timm lists no download for '{timm_name}' (VFM '{vfm_name}')")


def create_timm_model(
    *,
    timm_name: str,
    release_file: str,
    release_url: str,
    weights: Any = None,
    seed: int = 0,
    kwargs: Optional[Dict[str, Any]] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    vfm_name: str = "vfm",
    convert: Optional[Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]] = None,
) -> nn.Module:
    """A timm model with the official weights (``None``: timm's hub file, from the cache or downloaded),
    ``"random"`` (seeded) ones, or a local release file whose keys ``convert`` maps to timm's.

    ``kwargs`` are the builder's fixed timm arguments, ``model_kwargs`` the user's overrides (checked against
    the constructor before any download)."""
    import timm

    kwargs = dict(kwargs or {})
    kwargs.update(model_kwargs or {})
    src = parse_weights(weights, option="vfm_weights", what=f"VFM '{vfm_name}'")
    if src.kind == "default":
        check_constructor(lambda: timm.create_model(timm_name, pretrained=False, **kwargs), model_kwargs)
        file = _fetch_official(timm_name, vfm_name=vfm_name, release_file=release_file, release_url=release_url)
        logger.info("loading %s weights from %s", vfm_name, file)
        try:  # timm's own loader (its checkpoint filter, strict load) on the fetched file
            return timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=dict(file=file), **kwargs)
        except RuntimeError as e:
            if "Error(s) in loading state_dict" not in str(e):
                raise
            raise InvalidInputError(
                f"the official weights of VFM '{vfm_name}' ({file}) do not fit the architecture built with "
                f"model_kwargs={model_kwargs}: {' '.join(str(e).split())[:400]}"
            ) from e
    with seeded(seed):
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
    if src.kind == "path":
        if src.path.is_dir():
            raise InvalidInputError(f"vfm_weights: '{weights}' is a folder; pass the release file ({release_file})")
        sd = load_state_dict_file(src.path, option="vfm_weights")
        strict_load(model, convert(sd, model) if convert is not None else sd, option="vfm_weights", value=weights,
                    target=f"VFM '{vfm_name}'", expected=f"the official {release_file}")
        logger.info("loaded %s weights from %s", vfm_name, src.path)
    return model


def build_timm_vit(*, cfg: VFMCfg, weights: Any = None, seed: int = 0,
                   model_kwargs: Optional[Dict[str, Any]] = None) -> TimmViTFeatures:
    """DINO / DINOv2 / MAE: the timm ViT of ``cfg`` (dynamic image size) wrapped as a dense feature extractor."""
    vit = create_timm_model(timm_name=cfg.timm_name, release_file=cfg.release_file, release_url=cfg.release_url,
                            weights=weights, seed=seed, kwargs=dict(num_classes=0, dynamic_img_size=True),
                            model_kwargs=model_kwargs, vfm_name=cfg.name, convert=cfg.convert)
    return TimmViTFeatures(vit, name=cfg.name, pos_mode=cfg.pos_mode, mean=cfg.mean, std=cfg.std)
