"""The open_clip adapter against open_clip's own forward (full-size ViT-B/16, seeded random weights)."""
import copy

import pytest
import torch

from ovseg.attention import get_attention
from ovseg.backbones import create_clip
from ovseg.pos_embed import interpolate_pos_embed

from ..conftest import TINY_CLIP


@pytest.fixture(scope="module")
def vit_b16():
    clip = create_clip("ViT-B-16", "random", seed=0)
    clip.mha_layout = True  # torch MultiheadAttention's memory layout: bit-identical results
    yield clip
    clip.mha_layout = False


def _reference_tokens(visual, x):
    vis = copy.copy(visual)
    vis.output_tokens = True
    pooled, tokens = vis(x)  # tokens: ln_post(x)[:, 1:], pooled: ln_post(x)[:, 0] @ proj
    return pooled, tokens


def _ours(adapter, x, name="vanilla", **kw):
    tok, grid = adapter.forward_trunk(x)
    out, _, _ = adapter.forward_last_block(tok, grid, get_attention(name), residual=True, ffn=True, **kw)
    return out


@torch.inference_mode()
def test_vanilla_full_block_equals_open_clip_exactly_at_224(vit_b16):
    x = torch.randn(2, 3, 224, 224)
    fast = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)  # open_clip's block through torch's non-fused MHA path
        pooled, tokens = _reference_tokens(vit_b16.visual, x)
        out = _ours(vit_b16, x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    assert torch.equal(vit_b16.visual.ln_post(out)[:, 1:], tokens)
    torch.testing.assert_close(vit_b16.project(out)[:, 0], pooled, rtol=1e-5, atol=1e-5)
    # with torch's fused MHA fast path (the default under inference_mode) agreement is at float rounding level
    pooled_fast, tokens_fast = _reference_tokens(vit_b16.visual, x)
    torch.testing.assert_close(vit_b16.visual.ln_post(out)[:, 1:], tokens_fast, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_vanilla_full_block_equals_open_clip_at_non_224_non_square(vit_b16):
    h, w = 288, 352  # grid 18 x 22
    x = torch.randn(1, 3, h, w)
    ref = copy.deepcopy(vit_b16.visual)
    pos = ref.positional_embedding
    table = torch.cat([pos[:1], interpolate_pos_embed(pos[1:], (14, 14), (h // 16, w // 16))])
    ref.positional_embedding = torch.nn.Parameter(table)
    fast = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        _, tokens = _reference_tokens(ref, x)
        out = _ours(vit_b16, x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    assert torch.equal(vit_b16.visual.ln_post(out)[:, 1:], tokens)
    dense = vit_b16.forward_dense(x, get_attention("vanilla"))
    assert dense.shape == (1, 512, 18, 22)
    torch.testing.assert_close(dense[0, :, 3, 5], (tokens[0, 3 * 22 + 5] @ vit_b16.visual.proj), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_default_fast_layout_and_autocast_trunk_agree_with_open_clip():
    """The default contiguous layout (and the contiguous trunk used under autocast) equal open_clip's block to
    float rounding."""
    clip = create_clip("ViT-B-16", "random", model_kwargs=TINY_CLIP)
    x = torch.randn(2, 3, 96, 64)
    tok, grid = clip.forward_trunk(x)
    blk = clip.visual.transformer.resblocks[-1]
    out, _, _ = clip.forward_last_block(tok, grid, get_attention("vanilla"))
    torch.testing.assert_close(out, blk(tok), rtol=1e-5, atol=1e-5)
    for b in clip.visual.transformer.resblocks:
        torch.testing.assert_close(clip._block(b, tok), b(tok), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = clip.forward_trunk(x)
    torch.testing.assert_close(low.float(), tok, rtol=0.05, atol=0.05)


@torch.inference_mode()
def test_strategy_switches_on_tiny_clip():
    """Reduced block (no residual, no FFN) = out_proj(attention) exactly; maskclip = out_proj(v)."""
    clip = create_clip("ViT-B-16", "random", model_kwargs=TINY_CLIP)
    x = torch.randn(2, 3, 64, 96)
    tok, grid = clip.forward_trunk(x)
    blk = clip.visual.transformer.resblocks[-1]
    y = blk.ln_1(tok)
    d = y.shape[-1]
    wq, wk, wv = blk.attn.in_proj_weight.split(d)
    bq, bk, bv = blk.attn.in_proj_bias.split(d)
    v = y @ wv.T + bv
    out, g, has_cls = clip.forward_last_block(tok, grid, get_attention("maskclip"), residual=False, ffn=False)
    torch.testing.assert_close(out, blk.attn.out_proj(v), rtol=1e-5, atol=1e-5)
    assert g == (4, 6) and has_cls
    # MaskCLIP keeps residual + FFN (its reference adds x, then the FFN)
    out2, _, _ = clip.forward_last_block(tok, grid, get_attention("maskclip"), residual=True, ffn=True)
    r = tok + blk.attn.out_proj(v)
    torch.testing.assert_close(out2, r + blk.mlp(blk.ln_2(r)), rtol=1e-5, atol=1e-5)
    # k-k with Gaussian window, per head
    nh = clip.num_heads
    k = (y @ wk.T + bk).view(2, -1, nh, d // nh).transpose(1, 2)
    vv = v.view(2, -1, nh, d // nh).transpose(1, 2)
    from ovseg.attention import gaussian_kk_weights

    att = gaussian_kk_weights(k, grid=grid) @ vv
    exp = blk.attn.out_proj(att.transpose(1, 2).reshape(2, -1, d))
    out3, _, _ = clip.forward_last_block(tok, grid, get_attention("gaussian_kk"), residual=False, ffn=False, sigma=5.0)
    torch.testing.assert_close(out3, exp, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="VFM"):
        clip.forward_last_block(tok, grid, get_attention("proxy"), residual=False, ffn=False)


def test_unknown_architecture_and_tag_messages():
    with pytest.raises(ValueError, match="did you mean 'ViT-B-16'"):
        create_clip("ViT-B-61", "random")
    with pytest.raises(ValueError, match="did you mean 'openai'"):
        create_clip("ViT-B-16", "opnai")
    with pytest.raises(FileNotFoundError, match="clip_weights"):
        create_clip("ViT-B-16", "/nonexistent/ViT-B-16.pt")


def test_local_checkpoint_formats_load(tmp_path):
    """An open_clip state dict (.pt, 'state_dict' + 'module.' wrapped) and .safetensors load into the tiny arch
    when clip_tag says what they hold (GELU weights here: the source model is ViT-B-16 with GELU)."""
    from safetensors.torch import save_file

    src = create_clip("ViT-B-16", "random", seed=1, model_kwargs=TINY_CLIP)
    sd = src.model.state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, tmp_path / "ckpt.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "ckpt.safetensors"))
    for f in ("ckpt.pt", "ckpt.safetensors"):
        clip = create_clip("ViT-B-16", str(tmp_path / f), tag="laion2b_s34b_b88k", model_kwargs=TINY_CLIP)
        assert clip.activation == "gelu"
        for k, v in clip.model.state_dict().items():
            assert torch.equal(v, sd[k]), k
    # OpenAI's format: extra metadata keys -> QuickGELU architecture, without clip_tag
    sd_openai = dict(sd, input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                     vocab_size=torch.tensor(49408))
    torch.save(sd_openai, tmp_path / "openai.pt")
    clip = create_clip("ViT-B-16", str(tmp_path / "openai.pt"), model_kwargs=TINY_CLIP)
    from open_clip.transformer import QuickGELU

    assert isinstance(clip.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert clip.activation == "quick_gelu" and clip.identity["tag"] == "openai"
    # wrong architecture -> clear error naming counts
    with pytest.raises(ValueError, match="does not fit architecture 'ViT-B-16'.*shape mismatches"):
        create_clip("ViT-B-16", str(tmp_path / "ckpt.pt"), tag="laion2b_s34b_b88k")


class _Payload:
    """Stands for an arbitrary pickled object: torch.load(weights_only=True) must refuse to build it."""


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"weights": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        create_clip("ViT-B-16", str(tmp_path / "evil.pt"), model_kwargs=TINY_CLIP)


def test_offline_error_names_file_and_option(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    from ovseg.weights import WeightsUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty"), raising=False)
    with pytest.raises(WeightsUnavailableError) as e:
        create_clip("ViT-B-16", "openai", model_kwargs=TINY_CLIP, cache_dir=str(tmp_path / "empty"))
    msg = str(e.value)
    assert "ViT-B-16" in msg and "openai" in msg and "clip_weights=PATH" in msg
    assert "ViT-B-16.pt" in msg or "open_clip_model.safetensors" in msg
