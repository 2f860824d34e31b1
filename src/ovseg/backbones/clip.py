"""open_clip adapter: runs CLIP's ViT up to its last block, then hands that block to an attention strategy.

Blocks 1..L−1 run unchanged; the last block's ``ln_1`` output is projected to q, k, v (only the ones the
strategy needs), the strategy mixes the values, then ``out_proj``, optional residual and FFN, ``ln_post`` and
``proj`` (docs/methods.md, "CLIP's vision tower"). Position embeddings: docs/methods.md, "Positional embeddings".
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._registry import suggest
from ..attention import AttentionStrategy
from ..errors import InvalidInputError, InvalidTypeError
from ..pos_embed import interpolate_pos_embed
from ..weights import (
    check_constructor,
    is_torchscript_archive,
    load_state_dict_file,
    muted_root_logger,
    parse_weights,
    seeded,
    strict_load,
)
from .clip_weights import (
    OPENAI_EXTRA_KEYS,
    download_hint,
    fetch_tag_file,
    find_checkpoint,
    resolve_file_activation,
    tag_activation,
)
from .hooks import Collect, Intermediates, attention_weights

logger = logging.getLogger(__name__)

__all__ = ["CLIPAdapter", "create_clip", "list_clip_architectures", "clip_activation"]


def list_clip_architectures() -> list:
    """open_clip architecture names whose image tower is a plain ViT (usable by ovseg)."""
    import open_clip

    return [m for m in open_clip.list_models() if _is_plain_vit_cfg(open_clip.get_model_config(m))]


def _is_plain_vit_cfg(cfg: Optional[dict]) -> bool:
    if not cfg:
        return False
    v = cfg.get("vision_cfg", {})
    return (
        "timm_model_name" not in v
        and not isinstance(v.get("layers"), (list, tuple))  # ModifiedResNet
        and not v.get("attentional_pool", False)
        and v.get("pool_type", "tok") == "tok"
        and not v.get("final_ln_after_pool", False)
        and not any(v.get(k) for k in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
                                        "scale_attn", "scale_fc", "block_type"))
    )


def clip_activation(model: nn.Module) -> str:
    """The activation an open_clip model was built with, read from its modules: ``"quick_gelu"`` or ``"gelu"``
    (``"+"``-joined if the towers differ, ``"none"`` if neither is found)."""
    from open_clip.transformer import QuickGELU

    kinds = set()
    for m in model.modules():
        if isinstance(m, QuickGELU):
            kinds.add("quick_gelu")
        elif isinstance(m, nn.GELU):
            kinds.add("gelu" if m.approximate == "none" else f"gelu_{m.approximate}")
    return "+".join(sorted(kinds)) or "none"


class CLIPAdapter(nn.Module):
    """Wraps an open_clip ``CLIP`` model whose visual tower is open_clip's ``VisionTransformer``.

    Implements the :class:`ovseg.backbones.CLIPBackbone` protocol: the trunk with layer hooks
    (:meth:`forward_intermediates`), per-block pieces (:meth:`qkv`, :meth:`attn_out`, :meth:`ffn`), the last block
    with an attention strategy, the projection head and the text tower.

    Attributes:
        arch, weights: the architecture name and a short description of the weights (tag, path or "random").
        activation: ``"quick_gelu"`` or ``"gelu"``, read from the built model.
        identity: a JSON-able description of exactly which model this is (see :attr:`identity`).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, arch: str = "custom", weights: str = "custom",
                 origin: Optional[Dict[str, Any]] = None):
        super().__init__()
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise InvalidInputError(
                f"CLIP architecture '{arch}' has a {type(visual).__name__} image tower; ovseg needs open_clip's "
                "VisionTransformer (ViT-B-16, ViT-L-14, ViT-H-14, ...)"
            )
        if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
            raise InvalidInputError(f"CLIP architecture '{arch}' pools its tokens in a way ovseg does not support")
        if not all(isinstance(b, ResidualAttentionBlock) and not hasattr(b, "ln_1_kv")
                   for b in visual.transformer.resblocks):
            raise InvalidInputError(f"CLIP architecture '{arch}' uses custom attention blocks, not supported")
        last = visual.transformer.resblocks[-1]
        self.model = model
        self.tokenizer = tokenizer
        self.arch = arch
        self.weights = weights
        self.activation: str = clip_activation(model)
        self._origin = dict(source="custom", tag=None, path=None, seed=None, model_kwargs=None)
        self._origin.update(origin or {})
        self.patch_size: Tuple[int, int] = tuple(visual.patch_size)
        self.base_grid: Tuple[int, int] = tuple(visual.grid_size)
        self.width: int = visual.transformer.width
        self.num_heads: int = last.attn.num_heads
        self.num_blocks: int = len(visual.transformer.resblocks)
        self.embed_dim: int = visual.output_dim
        # True: lay out the last block's projections like torch's MultiheadAttention slow path, which makes the
        # vanilla strategy bit-identical to open_clip's block; False (default): contiguous and much faster
        self.mha_layout = False
        self.eval()

    @property
    def identity(self) -> Dict[str, Any]:
        """``{"arch", "source", "tag", "path", "activation", "seed", "model_kwargs"}``: ``source`` is ``"tag"``
        (open_clip pretrained tag), ``"file"`` (local checkpoint; ``path`` absolute, ``tag`` the tag it holds
        when known), ``"random"`` (``seed``) or ``"custom"`` (a model wrapped by hand); unused fields are None."""
        return dict(arch=self.arch, source=self._origin["source"], tag=self._origin["tag"],
                    path=self._origin["path"], activation=self.activation, seed=self._origin["seed"],
                    model_kwargs=copy.deepcopy(self._origin["model_kwargs"]))

    # ------------------------------------------------------------------ image side
    @property
    def visual(self):
        return self.model.visual

    def block(self, i: int) -> nn.Module:
        """open_clip's ``ResidualAttentionBlock`` number ``i`` (0-based; negative counts from the end)."""
        return self.visual.transformer.resblocks[i]

    def grid_size(self, height: int, width: int) -> Tuple[int, int]:
        """Token grid of an input: the conv stem floors, so trailing rows/columns get no token
        (docs/methods.md, "Sliding windows")."""
        return height // self.patch_size[0], width // self.patch_size[1]

    def embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Patch embedding, CLS, positional embedding (resized for the grid) and ``ln_pre``.

        x: (B, 3, H, W) CLIP-normalised -> ((B, 1+gh·gw, D), (gh, gw)).
        """
        vis = self.visual
        x = vis.conv1(x)  # (B, D, gh, gw)
        grid = (x.shape[-2], x.shape[-1])
        if grid[0] < 1 or grid[1] < 1:
            raise InvalidInputError(f"input {tuple(x.shape[-2:])} is smaller than one {self.patch_size} patch")
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = vis.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = vis.positional_embedding
        patch_pos = interpolate_pos_embed(pos[1:], self.base_grid, grid)
        x = x + torch.cat([pos[:1], patch_pos], dim=0).to(x.dtype)
        x = vis.patch_dropout(x)
        return vis.ln_pre(x), grid

    def forward_intermediates(self, x: torch.Tensor, collect: Optional[Collect] = None) -> Intermediates:
        """Embeddings and blocks 1..L−1 (every block but the last), collecting what ``collect`` names.

        Args:
            x: (B, 3, H, W) CLIP-normalised.
            collect: block outputs (``tokens``), per-head ``qkv`` and ``attn`` weights of blocks 0..L−2.

        Returns:
            :class:`Intermediates` whose ``x`` is the input of the last block, (B, 1+gh·gw, D).
        """
        collect = (collect or Collect()).resolved(self.num_blocks, limit=self.num_blocks - 1,
                                                 owner=f"CLIP '{self.arch}'")
        x, grid = self.embed(x)
        out = Intermediates(x, grid, embed=x if collect.embed else None)
        blocks = self.visual.transformer.resblocks[:-1]
        explicit = set(collect.qkv) | set(collect.attn)
        if torch.is_autocast_enabled(x.device.type) or explicit:
            # torch's MultiheadAttention leaves its fused fast path under autocast and projects a transposed
            # view, which F.linear turns into a huge expanded copy; the same block math, laid out contiguously
            for i in range(len(blocks)):
                x, qkv, attn = self.run_block(i, x, want_qkv=i in collect.qkv, want_attn=i in collect.attn)
                if qkv is not None:
                    out.qkv[i] = qkv
                if attn is not None:
                    out.attn[i] = attn
                if i in collect.tokens:
                    out.tokens[i] = x
        else:
            batch_first = getattr(self.visual.transformer, "batch_first", False)
            if not batch_first:
                x = x.transpose(0, 1)
            for i, blk in enumerate(blocks):
                x = blk(x)  # open_clip's own block (fused MHA fast path in inference)
                if i in collect.tokens:
                    out.tokens[i] = x if batch_first else x.transpose(0, 1)
            if not batch_first:
                x = x.transpose(0, 1)
        out.x = x
        return out

    def forward_trunk(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Embeddings and blocks 1..L−1. x: (B, 3, H, W) CLIP-normalised -> ((B, 1+gh·gw, D), (gh, gw))."""
        out = self.forward_intermediates(x)
        return out.x, out.grid

    # per-block pieces, used by strategies that rebuild a block -----------------------------------
    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> per head (B, nh, T, hd)."""
        b, n, d = t.shape
        return t.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def merge_heads(self, t: torch.Tensor) -> torch.Tensor:
        """Per head (B, nh, T, hd) -> (B, T, D)."""
        b, nh, n, hd = t.shape
        return t.transpose(1, 2).reshape(b, n, nh * hd)

    def attn_norm(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``i``'s pre-attention norm ``ln_1``: (B, T, D) -> (B, T, D), the ``y`` that :meth:`qkv` takes."""
        return self.block(i).ln_1(x)

    def qkv(self, i: int, y: torch.Tensor, needs: str = "qkv") -> Tuple[Optional[torch.Tensor], ...]:
        """Block ``i``'s in-projection of its normalised input ``y = ln_1(x)`` (B, T, D): per-head q, k, v
        (B, nh, T, hd), computing only the ones named in ``needs`` (None for the others)."""
        attn = self.block(i).attn
        d = y.shape[-1]
        w, bias = attn.in_proj_weight, attn.in_proj_bias
        if set(needs) == {"q", "k", "v"}:
            return tuple(self.heads(t) for t in F.linear(y, w, bias).chunk(3, dim=-1))
        out = []
        for j, name in enumerate("qkv"):
            if name in needs:
                out.append(self.heads(F.linear(y, w[j * d:(j + 1) * d],
                                               None if bias is None else bias[j * d:(j + 1) * d])))
            else:
                out.append(None)
        return tuple(out)

    def attn_out(self, i: int, o: torch.Tensor) -> torch.Tensor:
        """Block ``i``'s output projection of per-head attention outputs (B, nh, T, hd) -> (B, T, D)."""
        attn = self.block(i).attn
        return F.linear(self.merge_heads(o), attn.out_proj.weight, attn.out_proj.bias)

    def ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``i``'s second sub-block without its residual: ``ls_2(mlp(ln_2 x))``."""
        blk = self.block(i)
        return blk.ls_2(blk.mlp(blk.ln_2(x)))

    def run_block(
        self, i: int, x: torch.Tensor, *, want_qkv: bool = False, want_attn: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]], Optional[torch.Tensor]]:
        """Block ``i`` (pre-LN, full attention) on (B, T, D) with contiguous projections.

        Returns (output (B, T, D), (q, k, v) per head when ``want_qkv``, attention weights (B, nh, T, T) when
        ``want_attn``). ``attn_mask``: boolean (True = allowed) or additive, broadcastable to (B, nh, T, T).
        """
        blk = self.block(i)
        q, k, v = self.qkv(i, blk.ln_1(x))
        weights = None
        if want_attn:
            weights = attention_weights(q, k, q.shape[-1] ** -0.5, attn_mask)
            o = weights @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + blk.ls_1(self.attn_out(i, o))
        x = x + self.ffn(i, x)
        return x, ((q, k, v) if want_qkv else None), weights

    def _block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """open_clip's ResidualAttentionBlock (pre-LN, full attention) on (B, L, D) with contiguous projections."""
        i = list(self.visual.transformer.resblocks).index(blk)
        return self.run_block(i, x)[0]

    def forward_last_block(
        self,
        x: torch.Tensor,
        grid: Tuple[int, int],
        strategy: AttentionStrategy,
        *,
        residual: bool = True,
        ffn: bool = True,
        vfm_feats: Optional[torch.Tensor] = None,
        **params: Any,
    ) -> Tuple[torch.Tensor, Tuple[int, int], bool]:
        """The last block with ``strategy`` as its attention.

        x: (B, 1+gh·gw, D). Returns (tokens (B, L', D), output grid, whether token 0 is CLS).
        """
        blk = self.block(-1)
        attn = blk.attn
        b, n, d = x.shape
        nh, hd = self.num_heads, d // self.num_heads
        y = blk.ln_1(x)  # (B, L, D), contiguous: F.linear on a transposed view is pathologically slow
        if strategy.uses_vfm and vfm_feats is None:
            raise InvalidInputError(f"attention '{strategy.name}' needs VFM features (vfm_feats)")
        if self.mha_layout:  # torch MultiheadAttention's (L, B, D) layout: bit-identical to open_clip, slower
            y = y.transpose(0, 1)
            w, bias = attn.in_proj_weight, attn.in_proj_bias
            q, k, v = [None if name not in strategy.needs else
                       F.linear(y, w[j * d:(j + 1) * d], None if bias is None else bias[j * d:(j + 1) * d])
                       .contiguous().view(n, b * nh, hd).transpose(0, 1).view(b, nh, n, hd)
                       for j, name in enumerate("qkv")]
        else:
            q, k, v = self.qkv(-1, y, "".join(sorted(strategy.needs)))
        out = strategy.fn(q, k, v, scale=hd ** -0.5, grid=grid, vfm_feats=vfm_feats, **params)
        out_grid = tuple(vfm_feats.shape[-2:]) if strategy.uses_vfm else grid
        m = out.shape[2]
        if self.mha_layout:
            out = F.linear(out.permute(2, 0, 1, 3).reshape(m * b, d), attn.out_proj.weight, attn.out_proj.bias)
            out = out.view(m, b, d).transpose(0, 1)
        else:
            out = self.attn_out(-1, out)  # merge heads -> (B, L', D)
        if residual:
            if out.shape[1] != n:
                raise InvalidInputError(f"attention '{strategy.name}' changes the token count; "
                                        "it needs residual=False")
            out = x + blk.ls_1(out)
        if ffn:
            out = out + self.ffn(-1, out)
        return out, out_grid, strategy.keeps_cls

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``ln_post`` then ``proj`` on every token: (B, L, D) -> (B, L, E)."""
        x = self.visual.ln_post(x)
        return x @ self.visual.proj if self.visual.proj is not None else x

    def to_map(self, feats: torch.Tensor, grid: Tuple[int, int], *, has_cls: bool) -> torch.Tensor:
        """Projected tokens (B, [1+]gh·gw, E) -> a dense map (B, E, gh, gw), CLS dropped."""
        if has_cls:
            feats = feats[:, 1:]
        return feats.transpose(1, 2).reshape(feats.shape[0], feats.shape[2], grid[0], grid[1])

    def forward_dense(
        self,
        x: torch.Tensor,
        strategy: AttentionStrategy,
        *,
        residual: bool = True,
        ffn: bool = True,
        vfm_feats: Optional[torch.Tensor] = None,
        **params: Any,
    ) -> torch.Tensor:
        """Dense image features in CLIP's joint space: (B, 3, H, W) -> (B, E, h, w) (not normalised)."""
        tokens, grid = self.forward_trunk(x)
        tokens, grid, has_cls = self.forward_last_block(
            tokens, grid, strategy, residual=residual, ffn=ffn, vfm_feats=vfm_feats, **params)
        return self.to_map(self.project(tokens), grid, has_cls=has_cls)

    # ------------------------------------------------------------------ text side
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, context) token ids -> (N, E) text embeddings (not normalised), equal to open_clip's ``encode_text``
        to float32 rounding: causal text towers run only up to each prompt's end-of-text token, sharing the
        prompts' common prefixes (``ovseg.backbones.clip_text``)."""
        from .clip_text import encode_text

        return encode_text(self.model, tokens)


def _validate_arch(arch: str) -> None:
    import open_clip

    if not isinstance(arch, str):
        raise InvalidTypeError(f"clip must be an open_clip architecture name (str), got {type(arch).__name__}")
    names = open_clip.list_models()
    if arch not in names:
        raise InvalidInputError(
            f"unknown CLIP architecture '{arch}';{suggest(arch, names)} "
            "use an open_clip name such as 'ViT-B-16', 'ViT-L-14', 'ViT-H-14' (open_clip.list_models())"
        )
    if not _is_plain_vit_cfg(open_clip.get_model_config(arch)):
        raise InvalidInputError(
            f"CLIP architecture '{arch}' does not have a plain ViT image tower; ovseg supports "
            "open_clip VisionTransformer models such as 'ViT-B-16', 'ViT-L-14', 'ViT-H-14'"
        )


def _validate_tag(arch: str, tag: Any, tags: Sequence[str]) -> None:
    if not isinstance(tag, str):
        raise InvalidTypeError(f"clip_tag must be an open_clip pretrained tag (str), got {type(tag).__name__}")
    if tag not in tags:
        raise InvalidInputError(
            f"clip_tag '{tag}' is not a pretrained tag of '{arch}';{suggest(tag, tags)} "
            f"tags for {arch}: {', '.join(tags) or '(none)'}"
        )


def create_clip(
    arch: str = "ViT-B-16",
    weights: Union[str, os.PathLike, None] = "openai",
    *,
    tag: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    cache_dir: Optional[str] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
) -> CLIPAdapter:
    """Build an open_clip model with the activation its weights were trained with, and wrap it.

    Args:
        arch: open_clip architecture name (``ViT-B-16``, ``ViT-L-14``, ``ViT-H-14``, ``ViT-B-16-quickgelu``, ...).
        weights: an open_clip pretrained tag (``openai``, ``laion2b_s32b_b79k``; ``None`` = ``openai``), a local
            checkpoint (OpenAI's TorchScript ``.pt``, an open_clip state dict ``.pt/.bin``, ``.safetensors``) or a
            folder holding one (a downloaded hub folder, a Hugging Face cache folder), or ``"random"`` (seeded
            random initialisation of the real architecture).
        tag: for a local checkpoint, the open_clip pretrained tag it holds (e.g. ``"openai"`` for the hub's
            ``open_clip_pytorch_model.bin`` of OpenAI's ViT-B/16). Its pretrained config decides the activation.
            Without it the file must be recognisable, or ``arch``'s tags must agree on the activation
            (:mod:`ovseg.backbones.clip_weights`).
        device: where the model goes.
        seed: RNG seed for ``"random"``.
        cache_dir: Hugging Face download cache (default: the hub's own cache, ``HF_HUB_CACHE``).
        model_kwargs: extra open_clip model-config overrides (e.g. a smaller ``vision_cfg`` for tests).

    Raises:
        InvalidInputError: unknown architecture or tag, a file that does not fit ``arch``, or a file whose
            activation cannot be decided (the message gives the call for each choice).
        WeightsUnavailableError: a tag's file is neither cached nor downloadable (the message names the file,
            where to get it and the exact call that loads it).
    """
    import open_clip

    _validate_arch(arch)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag is not None:
        _validate_tag(arch, tag, tags)
    src = parse_weights(weights, option="clip_weights", tags=tags, what=f"'{arch}'")
    if src.kind == "default":
        if "openai" not in tags:
            raise InvalidInputError(f"'{arch}' has no 'openai' weights; pass clip_weights= one of its pretrained "
                                    f"tags: {', '.join(tags) or '(none)'}")
        src = parse_weights("openai", option="clip_weights", tags=tags)
    kwargs = dict(model_kwargs or {})
    state_dict, file = None, None
    if src.kind == "random":
        if tag is not None:
            raise InvalidInputError(
                f"clip_tag '{tag}' names the weights a local file holds; it does not combine with "
                f"clip_weights='random' (for random weights with QuickGELU use clip='{arch}-quickgelu' or the like)")
        quick_gelu, desc = False, "random"
        origin = dict(source="random", seed=seed)
    elif src.kind == "tag":
        if tag is not None and tag != src.tag:
            raise InvalidInputError(f"clip_tag '{tag}' contradicts clip_weights '{src.tag}'; clip_tag is for local "
                                    f"files (clip_weights=PATH, clip_tag=TAG)")
        quick_gelu, desc = tag_activation(arch, src.tag) == "quick_gelu", src.tag
        origin = dict(source="tag", tag=src.tag)
        # a model_kwargs typo surfaces as the constructor's own error, before any download
        check_constructor(lambda: open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu,
                                                         device="meta", **kwargs), kwargs)
        file = fetch_tag_file(arch, src.tag, cache_dir=cache_dir)
        logger.info("loading CLIP %s / %s from %s", arch, src.tag, file)
    else:
        file = find_checkpoint(src.path)
        desc = str(src.path)
        state_dict = load_state_dict_file(file, option="clip_weights")
        quick_gelu, found_tag, reason = resolve_file_activation(
            arch, file, list(state_dict), tag=tag, torchscript=is_torchscript_archive(file))
        origin = dict(source="file", tag=found_tag, path=str(file))
        logger.info("loading CLIP %s from %s with %s (%s)", arch, file, "QuickGELU" if quick_gelu else "GELU", reason)

    if file is not None and "quick_gelu" in kwargs and bool(kwargs["quick_gelu"]) != quick_gelu:
        raise InvalidInputError(
            f"model_kwargs quick_gelu={kwargs['quick_gelu']} contradicts the weights '{desc}', which need "
            f"{'QuickGELU' if quick_gelu else 'GELU'}; remove it (clip_tag says what a local file holds)")
    with seeded(seed), muted_root_logger():  # open_clip warns "initialized randomly" on the root logger
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu, **kwargs)
    if file is not None:
        if state_dict is None:
            state_dict = load_state_dict_file(file, option="clip_weights")
        for key in OPENAI_EXTRA_KEYS:
            state_dict.pop(key, None)
        expected = (f"the release file of '{arch}' / '{src.tag}' ({download_hint(arch, src.tag)})"
                    if src.kind == "tag" else f"a checkpoint of '{arch}' (or pass the matching clip= architecture)")
        strict_load(model, state_dict, option="clip_weights", value=desc, target=f"architecture '{arch}'",
                    expected=expected)
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(arch)
    origin["model_kwargs"] = copy.deepcopy(kwargs) or None
    return CLIPAdapter(model, tokenizer, arch=arch, weights=desc, origin=origin).to(device)
