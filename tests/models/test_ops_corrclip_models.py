"""CorrCLIP's ops on the real open_clip / timm architectures with seeded weights: the region tokens equal the
reference's masked full-sequence blocks, the value branch equals its formula, and one whole window reproduces
numbers dumped from the official code (CorrCLIP v1 on CPU in fp32, same seeded weights, image and masks)."""
import math

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.backbones import create_clip, create_vfm
from ovseg.config import CLIP_MEAN, CLIP_STD
from ovseg.ops import corrclip as cc
from ovseg.pos_embed import interpolate_pos_embed
from ovseg.sliding import pad_amounts

from ..conftest import TINY_CLIP


def _stream(clip, img):
    """CLIP's CLS/patch stream: tokens after ln_pre, every block's (k, v), every block's output but the last."""
    vis = clip.visual
    x = vis.conv1(img)
    grid = tuple(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([vis.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1), x], 1)
    pos = vis.positional_embedding
    x = vis.ln_pre(x + torch.cat([pos[:1], interpolate_pos_embed(pos[1:], clip.base_grid, grid)], 0))
    x0, kv, outs = x, [], []
    blocks = list(vis.transformer.resblocks)
    for i, blk in enumerate(blocks):
        b, n, d = x.shape
        nh = blk.attn.num_heads
        qkv = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias)
        _, k, v = qkv.view(b, n, 3, nh, d // nh).permute(2, 0, 3, 1, 4)
        kv.append((k, v))
        if i < len(blocks) - 1:
            x = blk(x)  # open_clip's own block (batch first)
            outs.append(x)
    return x0, kv, outs, grid


@torch.inference_mode()
def test_region_tokens_equal_reference_masked_sequence():
    clip = create_clip("ViT-B-16", "random", model_kwargs=TINY_CLIP)
    blocks = list(clip.visual.transformer.resblocks)
    img = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    x0, kv, outs, grid = _stream(clip, img)
    tok_regions = torch.tensor([[0, 0, 3, 3, 3], [0, 7, 7, 3, 3], [7, 7, 7, 9, 9], [9, 9, 9, 9, 0]])[None]
    assert tok_regions.shape[1:] == grid
    allow, valid, index = cc.region_token_allow(tok_regions)
    mine = cc.region_tokens(x0[:, 0], kv, blocks, allow)  # (1, K, D)

    # the reference: K copies of CLS prepended, one boolean mask (True = blocked) through every block
    k = allow.shape[1]
    seq = torch.cat([x0[:, :1].expand(-1, k, -1), x0], 1)  # (1, K + 1 + N, D)
    n_all = seq.shape[1]
    keep = torch.zeros(n_all, n_all, dtype=torch.bool)
    keep[k:, k:] = True
    keep[:k, k] = True
    keep[:k, k + 1:] = allow[0, :, 1:]
    # (the reference's vendored block passes the boolean mask through; open_clip >= 2.24 casts masks to the
    # input dtype, so give it the equivalent additive mask)
    additive = torch.zeros(n_all, n_all).masked_fill(~keep, float("-inf"))
    for blk in blocks:
        seq = blk(seq, attn_mask=additive)
    torch.testing.assert_close(mine, seq[:, :k], rtol=1e-4, atol=1e-4)
    # nobody attends to the region tokens: the CLS/patch stream is vanilla CLIP
    vanilla = x0
    for blk in blocks:
        vanilla = blk(vanilla)
    torch.testing.assert_close(seq[:, k:], vanilla, rtol=1e-4, atol=1e-4)
    # a batch of two windows with different region counts equals one by one
    tok2 = torch.stack([tok_regions[0], torch.full_like(tok_regions[0], 5)])
    img2 = torch.cat([img, img.flip(-1)])
    x0b, kvb, _, _ = _stream(clip, img2)
    allow2, valid2, _ = cc.region_token_allow(tok2)
    both = cc.region_tokens(x0b[:, 0], kvb, blocks, allow2)
    for b in range(2):
        one_allow, _, _ = cc.region_token_allow(tok2[b:b + 1])
        one = cc.region_tokens(x0b[b:b + 1, 0], [(kk[b:b + 1], vv[b:b + 1]) for kk, vv in kvb], blocks, one_allow)
        torch.testing.assert_close(both[b:b + 1, :one.shape[1]], one, rtol=1e-5, atol=1e-5)
    assert valid2.sum(1).tolist() == [4, 1]


@torch.inference_mode()
def test_correlation_branch_equals_reference_formula():
    clip = create_clip("ViT-B-16", "random", model_kwargs=TINY_CLIP)
    blk = clip.visual.transformer.resblocks[-1]
    g = torch.Generator().manual_seed(1)
    grid, size = (3, 4), (6, 8)
    x = torch.randn(2, 1 + 12, 64, generator=g)
    attn = torch.softmax(torch.randn(2, 48, 48, generator=g), -1)
    d = 64
    v = F.linear(blk.ln_1(x), blk.attn.in_proj_weight[2 * d:], blk.attn.in_proj_bias[2 * d:])  # (B, 1+N, D)
    v = v.permute(0, 2, 1)[:, :, 1:].unflatten(2, grid)
    v = F.interpolate(v, size=size, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    ref = blk.attn.out_proj(torch.bmm(attn, v))
    torch.testing.assert_close(cc.correlation_branch(attn, x, grid=grid, size=size, block=blk), ref,
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ official numbers
# Tiny configs of the same architectures as the official run (12 CLIP blocks: its hard-coded NUM_SPATIAL = 5).
ORACLE_CLIP = dict(embed_dim=64, vision_cfg=dict(image_size=224, layers=12, width=128, head_width=64, patch_size=16),
                   text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
ORACLE_DINO = dict(embed_dim=96, depth=2, num_heads=2)
MMSEG_MEAN = torch.tensor([122.771, 116.746, 104.094]).view(3, 1, 1)
MMSEG_STD = torch.tensor([68.501, 66.632, 70.323]).view(3, 1, 1)


def _seeded_state_dict(template, seed):
    """The weights the official run used: one generator over the sorted keys, scaled per kind of tensor."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(template):
        t = template[name]
        if not torch.is_floating_point(t):
            out[name] = t.clone()
            continue
        r = torch.randn(t.shape, generator=g, dtype=torch.float32)
        short = name.split(".")[-1]
        if name.endswith("logit_scale"):
            v = torch.full_like(r, math.log(1 / 0.07))
        elif t.dim() == 1 and short == "weight":
            v = 1 + 0.1 * r
        elif short in ("bias", "in_proj_bias"):
            v = 0.02 * r
        elif name.endswith(("proj", "text_projection")) and t.dim() == 2:
            v = r / math.sqrt(t.shape[0])
        elif t.dim() >= 2 and "embed" not in name and "positional" not in name and "token" not in name:
            v = r / math.sqrt(float(np.prod(t.shape[1:])))
        else:
            v = 0.1 * r
        out[name] = v
    return out


def _oracle_case1_image():
    """The official run's synthetic 'case1' at its original size: uint8 (200, 400, 3) and int64 regions."""
    rng = np.random.RandomState(101)
    h0, w0 = 200, 400
    yy, xx = np.mgrid[0:h0, 0:w0]
    img = np.stack([40 + 120 * yy / h0, 60 + 100 * xx / w0, 90 + 0 * xx], -1)
    regions = np.full((h0, w0), 3, np.int64)
    regions[:, w0 // 2:] = 4
    for k in range(4):
        cy, cx = rng.randint(h0 // 5, 4 * h0 // 5), rng.randint(w0 // 5, 4 * w0 // 5)
        ry, rx = rng.randint(20, h0 // 3), rng.randint(20, w0 // 3)
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        img[m] = rng.randint(0, 255, 3)
        regions[m] = 5 + k
    img = np.clip(img + rng.randn(h0, w0, 3) * 6, 0, 255).astype(np.uint8)
    return img, regions


def _oracle_case1():
    """The official run's 'case1' resized to 250x500 as the official run did: CLIP-normalised x and regions."""
    img, regions = _oracle_case1_image()
    t = torch.from_numpy(img).permute(2, 0, 1).float()[None]
    t = F.interpolate(t, size=(250, 500), mode="bilinear", align_corners=False).round().clamp(0, 255)[0]
    x = ((t - MMSEG_MEAN) / MMSEG_STD)[None]
    r = cc.resize_region_map(torch.from_numpy(regions)[None].int(), (250, 500))
    return x, r


@torch.inference_mode()
def test_window_reproduces_official_numbers():
    clip = create_clip("ViT-B-16-quickgelu", "random", model_kwargs=ORACLE_CLIP)
    clip.model.load_state_dict(_seeded_state_dict(clip.model.state_dict(), seed=1))
    vfm = create_vfm("dino_b8", "random", model_kwargs=ORACLE_DINO)
    vfm.vit.load_state_dict(_seeded_state_dict(vfm.vit.state_dict(), seed=2))
    x, regions = _oracle_case1()
    # first window of the official slide: rows 0:250, columns 0:336, padded to 280 x 336 (top/bottom 15)
    crop, reg = x[:, :, :, :336], regions[:, :, :336]
    pad = pad_amounts(250, 336, 56)
    assert pad == (0, 0, 15, 15)
    crop, reg = F.pad(crop, pad), cc.pad_region_map(reg, pad)

    store = {}
    hook = vfm.vit.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: store.__setitem__("qkv", o))
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    vfm.forward_features((crop * std + mean - torch.tensor(vfm.mean).view(1, 3, 1, 1))
                         / torch.tensor(vfm.std).view(1, 3, 1, 1))
    hook.remove()
    q, k, _ = store["qkv"].view(1, 1 + 35 * 42, 3, 2, 48).permute(2, 0, 3, 1, 4)
    feats, size = cc.vfm_qk_features(q, k), (35, 42)

    merged = cc.merge_regions(cc.resize_region_map(reg, size), feats)
    assert merged.unique().tolist() == [3, 10000, 10001, 10002, 10003, 10004]  # official: the same ids
    attn = cc.scope_attention(feats, merged)
    official_attn = torch.tensor([[0.0187797, 0.0016949, 0.0010761, 0.0], [0.0, 0.0, 0.0, 0.0040596],
                                  [0.0, 0.0020641, 0.0031788, 0.0]])
    torch.testing.assert_close(attn[0][[0, 500, 1400]][:, [0, 1, 2, 500]], official_attn, rtol=1e-4, atol=1e-6)

    blocks = list(clip.visual.transformer.resblocks)
    x0, kv, outs, grid = _stream(clip, crop)
    spatial = cc.mean_block_outputs([outs[i] for i in cc.spatial_block_indices(len(blocks))])
    main = cc.correlation_branch(attn, outs[-1], grid=grid, size=size, block=blocks[-1])
    spat = cc.correlation_branch(attn, spatial, grid=grid, size=size, block=blocks[-1])
    allow, valid, index = cc.region_token_allow(cc.resize_region_map(merged, grid))
    tokens = cc.region_tokens(x0[:, 0], kv, blocks, allow)
    official_tokens = torch.tensor([[-2.0536585, -6.3155446, 8.5596838, 2.9557366],
                                    [-3.5862145, -7.0244541, 4.5921826, 4.8257127],
                                    [-4.6000586, -3.9580584, 6.2200055, 3.8566172],
                                    [-4.9860706, -3.3412390, 10.6024551, 3.2187443],
                                    [-10.8036642, -1.2523245, 6.7126193, 1.1091442],
                                    [-4.8888168, -8.5245428, 1.8306038, 1.2501322]])
    torch.testing.assert_close(tokens[0, :, :4], official_tokens, rtol=1e-4, atol=1e-4)
    sem = cc.scatter_region_tokens(tokens, index, size)
    out = cc.fuse_branches(main, spat, sem, ln_post=clip.visual.ln_post, proj=clip.visual.proj)
    official = torch.tensor([[1.8430248, -0.1654911, 0.5823444, 0.1172756, 1.2308176],
                             [1.9217916, -0.8465908, 0.9786998, 0.5414195, 0.9941382],
                             [-0.8802179, 1.3689511, -0.8406648, -0.0760569, -0.6895984],
                             [1.3795004, -0.0292248, 0.1687390, 0.1789999, 1.0220196]])
    torch.testing.assert_close(out[0, [0, 100, 777, 1469], :5], official, rtol=1e-4, atol=1e-4)
