"""open_clip adapter: runs CLIP's ViT up to its last block, then hands that block to an attention strategy.

Blocks 1..L−1 run unchanged; the last block's ``ln_1`` output is projected to q, k, v (only the ones the
strategy needs), the strategy mixes the values, then ``out_proj``, optional residual and FFN, ``ln_post`` and
``proj`` (docs/methods.md, "CLIP's vision tower"). Position embeddings: docs/methods.md, "Positional embeddings".
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._registry import suggest
from ..attention import AttentionStrategy
from ..pos_embed import interpolate_pos_embed
from ..weights import WeightsUnavailableError, load_state_dict_file, muted_root_logger, resolve_path, seeded

logger = logging.getLogger(__name__)

__all__ = ["CLIPAdapter", "create_clip", "list_clip_architectures"]

_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "__torchscript__")


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


class CLIPAdapter(nn.Module):
    """Wraps an open_clip ``CLIP`` model whose visual tower is open_clip's ``VisionTransformer``."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, arch: str = "custom", weights: str = "custom"):
        super().__init__()
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"CLIP architecture '{arch}' has a {type(visual).__name__} image tower; ovseg needs open_clip's "
                "VisionTransformer (ViT-B-16, ViT-L-14, ViT-H-14, ...)"
            )
        if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
            raise ValueError(f"CLIP architecture '{arch}' pools its tokens in a way ovseg does not support")
        last = visual.transformer.resblocks[-1]
        if not isinstance(last, ResidualAttentionBlock) or hasattr(last, "ln_1_kv"):
            raise ValueError(f"CLIP architecture '{arch}' uses custom attention blocks, not supported")
        self.model = model
        self.tokenizer = tokenizer
        self.arch = arch
        self.weights = weights
        self.patch_size: Tuple[int, int] = tuple(visual.patch_size)
        self.base_grid: Tuple[int, int] = tuple(visual.grid_size)
        self.width: int = visual.transformer.width
        self.num_heads: int = last.attn.num_heads
        self.embed_dim: int = visual.output_dim
        # True: lay out the last block's projections like torch's MultiheadAttention slow path, which makes the
        # vanilla strategy bit-identical to open_clip's block; False (default): contiguous and much faster
        self.mha_layout = False
        self.eval()

    # ------------------------------------------------------------------ image side
    @property
    def visual(self):
        return self.model.visual

    def grid_size(self, height: int, width: int) -> Tuple[int, int]:
        """Token grid of an input: the conv stem floors, so trailing rows/columns get no token
        (docs/methods.md, "Sliding windows")."""
        return height // self.patch_size[0], width // self.patch_size[1]

    def forward_trunk(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Embeddings and blocks 1..L−1. x: (B, 3, H, W) CLIP-normalised -> ((B, 1+gh·gw, D), (gh, gw))."""
        vis = self.visual
        x = vis.conv1(x)  # (B, D, gh, gw)
        grid = (x.shape[-2], x.shape[-1])
        if grid[0] < 1 or grid[1] < 1:
            raise ValueError(f"input {tuple(x.shape[-2:])} is smaller than one {self.patch_size} patch")
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = vis.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = vis.positional_embedding
        patch_pos = interpolate_pos_embed(pos[1:], self.base_grid, grid)
        x = x + torch.cat([pos[:1], patch_pos], dim=0).to(x.dtype)
        x = vis.patch_dropout(x)
        x = vis.ln_pre(x)
        blocks = vis.transformer.resblocks
        if torch.is_autocast_enabled(x.device.type):
            # torch's MultiheadAttention leaves its fused fast path under autocast and projects a transposed
            # view, which F.linear turns into a huge expanded copy; the same block math, laid out contiguously
            for blk in blocks[:-1]:
                x = self._block(blk, x)
            return x, grid
        batch_first = getattr(vis.transformer, "batch_first", False)
        if not batch_first:
            x = x.transpose(0, 1)
        for blk in blocks[:-1]:
            x = blk(x)  # open_clip's own block (fused MHA fast path in inference)
        if not batch_first:
            x = x.transpose(0, 1)
        return x, grid

    def _block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """open_clip's ResidualAttentionBlock (pre-LN, full attention) on (B, L, D) with contiguous projections."""
        b, n, d = x.shape
        nh = blk.attn.num_heads
        qkv = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, nh, d // nh).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, L, hd)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + blk.ls_1(F.linear(a, blk.attn.out_proj.weight, blk.attn.out_proj.bias))
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

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
        blk = self.visual.transformer.resblocks[-1]
        attn = blk.attn
        b, n, d = x.shape
        nh, hd = self.num_heads, d // self.num_heads
        y = blk.ln_1(x)  # (B, L, D), contiguous: F.linear on a transposed view is pathologically slow
        if self.mha_layout:  # torch MultiheadAttention's (L, B, D) layout: bit-identical to open_clip, slower
            y = y.transpose(0, 1)
        w, bias = attn.in_proj_weight, attn.in_proj_bias
        if strategy.needs == {"q", "k", "v"}:
            q, k, v = F.linear(y, w, bias).chunk(3, dim=-1)
        else:  # project only what the strategy reads
            def _proj(i: int) -> Optional[torch.Tensor]:
                if "qkv"[i] not in strategy.needs:
                    return None
                return F.linear(y, w[i * d:(i + 1) * d], None if bias is None else bias[i * d:(i + 1) * d])
            q, k, v = _proj(0), _proj(1), _proj(2)

        def heads(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if t is None:
                return None
            if self.mha_layout:
                return t.contiguous().view(n, b * nh, hd).transpose(0, 1).view(b, nh, n, hd)
            return t.reshape(b, n, nh, hd).transpose(1, 2)  # (B, nh, L, hd)

        if strategy.uses_vfm and vfm_feats is None:
            raise ValueError(f"attention '{strategy.name}' needs VFM features (vfm_feats)")
        out = strategy.fn(heads(q), heads(k), heads(v), scale=hd ** -0.5, grid=grid, vfm_feats=vfm_feats, **params)
        out_grid = tuple(vfm_feats.shape[-2:]) if strategy.uses_vfm else grid
        m = out.shape[2]
        if self.mha_layout:
            out = F.linear(out.permute(2, 0, 1, 3).reshape(m * b, d), attn.out_proj.weight, attn.out_proj.bias)
            out = out.view(m, b, d).transpose(0, 1)
        else:
            out = out.transpose(1, 2).reshape(b, m, d)  # merge heads -> (B, L', D)
            out = F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
        if residual:
            if out.shape[1] != n:
                raise ValueError(f"attention '{strategy.name}' changes the token count; it needs residual=False")
            out = x + blk.ls_1(out)
        if ffn:
            out = out + blk.ls_2(blk.mlp(blk.ln_2(out)))
        return out, out_grid, strategy.keeps_cls

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``ln_post`` then ``proj`` on every token: (B, L, D) -> (B, L, E)."""
        x = self.visual.ln_post(x)
        return x @ self.visual.proj if self.visual.proj is not None else x

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
        feats = self.project(tokens)
        if has_cls:
            feats = feats[:, 1:]
        return feats.transpose(1, 2).reshape(feats.shape[0], feats.shape[2], grid[0], grid[1])

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
        raise TypeError(f"clip must be an open_clip architecture name (str), got {type(arch).__name__}")
    names = open_clip.list_models()
    if arch not in names:
        raise ValueError(
            f"unknown CLIP architecture '{arch}';{suggest(arch, names)} "
            "use an open_clip name such as 'ViT-B-16', 'ViT-L-14', 'ViT-H-14' (open_clip.list_models())"
        )
    if not _is_plain_vit_cfg(open_clip.get_model_config(arch)):
        raise ValueError(
            f"CLIP architecture '{arch}' does not have a plain ViT image tower; ovseg supports "
            "open_clip VisionTransformer models such as 'ViT-B-16', 'ViT-L-14', 'ViT-H-14'"
        )


def _download_hint(arch: str, tag: str) -> str:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    where = []
    if cfg.get("hf_hub"):
        repo = cfg["hf_hub"].rstrip("/")
        where.append(f"https://huggingface.co/{repo} (open_clip_model.safetensors or open_clip_pytorch_model.bin)")
    if cfg.get("url"):
        where.append(cfg["url"])
    return " or ".join(where) if where else "the open_clip model zoo"


def create_clip(
    arch: str = "ViT-B-16",
    weights: Union[str, os.PathLike, None] = "openai",
    *,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    cache_dir: Optional[str] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
) -> CLIPAdapter:
    """Build an open_clip model and wrap it.

    Args:
        arch: open_clip architecture name (``ViT-B-16``, ``ViT-L-14``, ``ViT-H-14``, ...).
        weights: an open_clip pretrained tag (``openai``, ``laion2b_s32b_b79k``), a local checkpoint path
            (OpenAI's TorchScript ``.pt``, an open_clip state dict, ``.safetensors``) or ``"random"``
            (seeded random initialisation of the real architecture).
        device: where the model goes.
        seed: RNG seed for ``"random"``.
        cache_dir: download cache (default: the hub's own cache).
        model_kwargs: extra open_clip model-config overrides (e.g. a smaller ``vision_cfg`` for tests).
    """
    import open_clip

    _validate_arch(arch)
    weights = "openai" if weights is None else weights
    kwargs = dict(model_kwargs or {})
    quick_gelu = False
    state_dict = None
    if isinstance(weights, (str, os.PathLike)) and str(weights) == "random":
        desc = "random"
    elif isinstance(weights, str) and weights in open_clip.list_pretrained_tags_by_model(arch):
        desc = weights
        quick_gelu = bool((open_clip.get_pretrained_cfg(arch, weights) or {}).get("quick_gelu", False))
        logger.info("loading CLIP %s / %s", arch, weights)
        try:
            with muted_root_logger():
                model = open_clip.create_model(arch, pretrained=weights, force_quick_gelu=quick_gelu,
                                               cache_dir=cache_dir, **kwargs)
        except Exception as e:  # download impossible: offline, no cache, hub error
            raise WeightsUnavailableError(
                f"could not load CLIP '{arch}' weights '{weights}' ({type(e).__name__}). Download "
                f"{_download_hint(arch, weights)} on a connected machine and pass its local path with "
                f"clip_weights=PATH (CLI: --clip-weights PATH)."
            ) from None
    elif isinstance(weights, (str, os.PathLike)) and (os.sep in str(weights) or os.path.splitext(str(weights))[1]
                                                      or os.path.exists(os.path.expanduser(str(weights)))):
        path = resolve_path(weights, "clip_weights")
        state_dict = load_state_dict_file(path, option="clip_weights")
        quick_gelu = any(k in state_dict for k in _OPENAI_EXTRA_KEYS) or arch.endswith("quickgelu")
        desc = str(path)
    else:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ValueError(
            f"clip_weights '{weights}' is not a pretrained tag of '{arch}', an existing file, or 'random';"
            f"{suggest(str(weights), tags)} tags for {arch}: {', '.join(tags) or '(none)'}"
        )

    if desc == "random" or state_dict is not None:
        with seeded(seed), muted_root_logger():  # open_clip warns "initialized randomly" on the root logger
            model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu, **kwargs)
    if state_dict is not None:
        for key in _OPENAI_EXTRA_KEYS:
            state_dict.pop(key, None)
        try:
            missing, unexpected = model.load_state_dict(state_dict, strict=False)
        except RuntimeError as e:  # shape mismatch
            raise ValueError(
                f"clip_weights '{weights}' does not fit architecture '{arch}': "
                f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}. "
                "Pass the matching clip= architecture name."
            ) from None
        if missing or unexpected:
            raise ValueError(
                f"clip_weights '{weights}' does not fit architecture '{arch}': {len(missing)} missing keys "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). "
                "Pass the matching clip= architecture name."
            )
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(arch)
    return CLIPAdapter(model, tokenizer, arch=arch, weights=desc).to(device)
