"""A tiny CLIP in OpenAI's checkpoint layout with integer-generated weights, and integer-generated inputs.

The official SC-CLIP and ResCLIP code was run on exactly these weights and inputs (outside this repository); the
tests compare ovseg's functions with literal slices of its outputs. Everything is built from ``torch.randint``
(integer RNG), so the same numbers come out on any CPU; every weight is exactly representable in fp16 (the
official loader casts to fp16 and back). Keep this recipe unchanged, or the literals no longer apply.

Architecture: ViT with width 128, 12 layers, 2 heads of 64, patch 16, 224 px (14x14 grid), embed 64, QuickGELU;
text tower of width 64 with 1 layer (unused by the tests: text embeddings are integer-generated too).
"""
from __future__ import annotations

import math
import zlib
from typing import Dict

import torch
import torch.nn.functional as F

CFG = dict(width=128, layers=12, patch=16, grid=14, embed=64, t_width=64, t_layers=1, ctx=77, vocab=49408)
OPEN_CLIP_KWARGS = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=224, layers=12, width=128, patch_size=16, head_width=64),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
)
MEAN = torch.tensor([122.771, 116.746, 104.094]).view(3, 1, 1)  # the references' SegDataPreProcessor (RGB)
STD = torch.tensor([68.501, 66.632, 70.323]).view(3, 1, 1)
LABELS = ["sky, cloud", "grass", "red box", "blue ball", "road, street"]  # 5 classes, 7 queries
QUERY_CLASS = [0, 0, 1, 2, 3, 4, 4]


def _values(key: str, shape, std: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    e = int(round(math.log2(73.6 / std)))
    return torch.randint(-127, 128, tuple(shape), generator=g).to(torch.float32) * 2.0 ** -e


def _ln(prefix: str, n: int, seed: int, sd: dict) -> None:
    sd[prefix + ".weight"] = (1.0 + _values(prefix + ".weight", (n,), 0.05, seed)).half().float()
    sd[prefix + ".bias"] = _values(prefix + ".bias", (n,), 0.02, seed)


def _blocks(prefix: str, width: int, layers: int, seed: int, sd: dict) -> None:
    for i in range(layers):
        p = f"{prefix}.resblocks.{i}"
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        sd[p + ".attn.in_proj_weight"] = _values(p + ".attn.in_proj_weight", (3 * width, width), width ** -0.5, seed)
        sd[p + ".attn.in_proj_bias"] = _values(p + ".attn.in_proj_bias", (3 * width,), 0.02, seed)
        sd[p + ".attn.out_proj.weight"] = _values(p + ".attn.out_proj.weight", (width, width), proj_std, seed)
        sd[p + ".attn.out_proj.bias"] = _values(p + ".attn.out_proj.bias", (width,), 0.02, seed)
        _ln(p + ".ln_1", width, seed, sd)
        sd[p + ".mlp.c_fc.weight"] = _values(p + ".mlp.c_fc.weight", (4 * width, width), (2 * width) ** -0.5, seed)
        sd[p + ".mlp.c_fc.bias"] = _values(p + ".mlp.c_fc.bias", (4 * width,), 0.02, seed)
        sd[p + ".mlp.c_proj.weight"] = _values(p + ".mlp.c_proj.weight", (width, 4 * width), proj_std, seed)
        sd[p + ".mlp.c_proj.bias"] = _values(p + ".mlp.c_proj.bias", (width,), 0.02, seed)
        _ln(p + ".ln_2", width, seed, sd)


def tiny_state_dict(seed: int = 0) -> Dict[str, torch.Tensor]:
    """OpenAI-layout state dict (the official loaders read it as is)."""
    c = CFG
    w, t = c["width"], c["t_width"]
    sd: Dict[str, torch.Tensor] = {}
    sd["visual.class_embedding"] = _values("visual.class_embedding", (w,), w ** -0.5, seed)
    sd["visual.positional_embedding"] = _values("visual.positional_embedding", (c["grid"] ** 2 + 1, w),
                                                w ** -0.5, seed)
    sd["visual.conv1.weight"] = _values("visual.conv1.weight", (w, 3, c["patch"], c["patch"]),
                                        (3 * c["patch"] ** 2) ** -0.5, seed)
    _ln("visual.ln_pre", w, seed, sd)
    _blocks("visual.transformer", w, c["layers"], seed, sd)
    _ln("visual.ln_post", w, seed, sd)
    sd["visual.proj"] = _values("visual.proj", (w, c["embed"]), w ** -0.5, seed)
    sd["positional_embedding"] = _values("positional_embedding", (c["ctx"], t), 0.01, seed)
    sd["token_embedding.weight"] = _values("token_embedding.weight", (c["vocab"], t), 0.02, seed)
    _blocks("transformer", t, c["t_layers"], seed, sd)
    _ln("ln_final", t, seed, sd)
    sd["text_projection"] = _values("text_projection", (t, c["embed"]), t ** -0.5, seed)
    sd["logit_scale"] = torch.tensor(2.65625)
    sd["input_resolution"] = torch.tensor(c["grid"] * c["patch"])
    sd["context_length"] = torch.tensor(c["ctx"])
    sd["vocab_size"] = torch.tensor(c["vocab"])
    return sd


def build_tiny_clip(tmp_dir):
    """ovseg's CLIP adapter (open_clip ViT-B-16 code path, QuickGELU) loading the tiny OpenAI-layout checkpoint."""
    from ovseg.backbones.clip import create_clip

    path = tmp_dir / "tiny_openai_clip.pt"
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in tiny_state_dict().items()}, path)
    return create_clip("ViT-B-16", str(path), model_kwargs=OPEN_CLIP_KWARGS)


def synthetic_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Structured uint8 RGB (3, h, w): sky gradient, ground, road, a red box, a blue disc, texture, bright specks."""
    yy = torch.arange(h).view(h, 1).expand(h, w)
    xx = torch.arange(w).view(1, w).expand(h, w)
    img = torch.zeros(3, h, w, dtype=torch.int64)
    sky = yy < (2 * h) // 5
    img[0] = torch.where(sky, 90 + (60 * yy) // h, 60 + (40 * xx) // w)
    img[1] = torch.where(sky, 140 + (80 * yy) // h, 150 - (30 * yy) // h)
    img[2] = torch.where(sky, 230 - (40 * yy) // h, 50 + (20 * xx) // w)
    road = (yy > (3 * h) // 4) & ((xx - w // 2).abs() < (yy - (3 * h) // 4) + w // 8)
    img[:, road] = torch.tensor([110, 110, 115]).view(3, 1)
    y0, x0 = h // 3 + seed % 7, w // 5
    box = (yy >= y0) & (yy < y0 + h // 5) & (xx >= x0) & (xx < x0 + w // 6)
    img[:, box] = torch.tensor([220, 40, 35]).view(3, 1)
    cy, cx, r = (h * 3) // 5, (w * 2) // 3, min(h, w) // 8
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    img[:, disc] = torch.tensor([30, 60, 210]).view(3, 1)
    g = torch.Generator().manual_seed(1000 + seed)
    img = img + torch.randint(-12, 13, (3, h, w), generator=g)
    for s in torch.randint(0, h * w, (4,), generator=g).tolist():
        y, x = divmod(s, w)
        img[:, y:y + 8, x:x + 8] = 255
    return img.clamp(0, 255).to(torch.uint8)


def normalize(img_u8: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 -> (1, 3, H, W) float32 with the references' mean/std."""
    return ((img_u8.float() - MEAN) / STD).unsqueeze(0)


def integer_text(num_queries: int = 7, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """(Q, E) unit-norm query embeddings from integers."""
    g = torch.Generator().manual_seed(7919 * seed + zlib.crc32(b"text"))
    t = torch.randint(-64, 65, (num_queries, dim), generator=g).float()
    return t / t.norm(dim=-1, keepdim=True)


def ints(shape, seed: int, lo: int, hi: int, div: float) -> torch.Tensor:
    """Small exact test inputs: ``randint(lo, hi) / div``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, tuple(shape), generator=g).float() / div


@torch.no_grad()
def run_trunk(clip, crops: torch.Tensor):
    """Blocks 1..L−1 of ovseg's adapter; returns ({block number: (B, 1+N, D) output}, {block: (B, nh, T, T)
    post-softmax q-k attention}, grid)."""
    blocks = clip.visual.transformer.resblocks
    outs, ins = {}, {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i + 1, o)) for i, b in enumerate(blocks)]
    hooks += [b.register_forward_pre_hook(lambda m, a, i=i: ins.__setitem__(i + 1, a[0]))
              for i, b in enumerate(blocks)]
    try:
        _, grid = clip.forward_trunk(crops)
    finally:
        for h in hooks:
            h.remove()
    if not getattr(clip.visual.transformer, "batch_first", True):
        outs = {i: o.transpose(0, 1) for i, o in outs.items()}
        ins = {i: o.transpose(0, 1) for i, o in ins.items()}
    maps = {}
    for i, x in ins.items():
        blk = blocks[i - 1]
        b, t, d = x.shape
        nh = blk.attn.num_heads
        q, k, _ = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
        q, k = (z.reshape(b, t, nh, d // nh).transpose(1, 2) for z in (q, k))
        maps[i] = torch.softmax((q * (d // nh) ** -0.5) @ k.transpose(-2, -1), dim=-1)
    return outs, maps, grid
