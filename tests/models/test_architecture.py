"""The dense model as an nn.Module, layer hooks, strategy-owned parameters, the head, atomic configure/to,
and the tensor paths of the predictor (small configs of the real architectures, seeded random weights)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg import Segmenter, list_methods
from ovseg.backbones import CLIPBackbone, Collect, create_clip, create_vfm, register_clip
from ovseg.backbones.protocol import CLIPS
from ovseg.errors import InvalidInputError, InvalidTypeError
from ovseg.head import Head, class_scores
from ovseg.methods import METHODS, MethodCfg, get_method, register_method
from ovseg.model import DenseModel
from ovseg.params import Param, positive
from ovseg.strategies import STRATEGIES, DenseStrategy, register_strategy

from ..conftest import TINY_CLIP, TINY_DINO, make_segmenter

LABELS = ["cat", "sofa; couch", "floor"]


@pytest.fixture(scope="module")
def proxy():
    return make_segmenter("proxyclip")


def test_dense_model_is_a_plain_module(proxy, rgb_image):
    model = proxy.model
    assert isinstance(model, DenseModel) and isinstance(model, torch.nn.Module)
    # state_dict holds CLIP's and the VFM's weights (the normalisation buffers are derived, not saved)
    keys = model.state_dict().keys()
    assert any(k.startswith("clip.model.visual.") for k in keys) and any(k.startswith("vfms.vfm.vit.") for k in keys)
    assert not any("clip_mean" in k or "_vfm_stats" in k for k in keys)
    crops = torch.randn(2, 3, 112, 168, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        feats = model(crops)
    assert feats.shape == (2, 32, 14, 21)  # DINO /8 grid of a 112x168 window, CLIP's embed dim
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(2, 14, 21))
    # another model with other random weights gives the same features once it loads this state_dict
    other = make_segmenter("proxyclip", seed=7).model
    with torch.inference_mode():
        assert not torch.allclose(other(crops), feats)
        other.load_state_dict(model.state_dict())
        torch.testing.assert_close(other(crops), feats, rtol=0, atol=0)


def test_dense_model_half_casts_inputs_and_buffers(rgb_image):
    model = make_segmenter("clearclip").model
    crops = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(crops)
        model.half()
        low = model(crops)  # fp32 crops are cast to the model's dtype
    assert low.dtype == torch.float32 and model.clip_mean.dtype == torch.float16
    # fp16 weights and activations: cosine features agree to ~1e-2 (fp16 has 11 significant bits)
    assert F.cosine_similarity(low, ref, dim=1).min() > 0.99


def test_clip_hooks_collect_without_rerunning():
    clip = create_clip("ViT-B-16", "random", model_kwargs=dict(TINY_CLIP, vision_cfg=dict(
        TINY_CLIP["vision_cfg"], layers=4)))
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = clip.forward_intermediates(x)
        out = clip.forward_intermediates(x, Collect(tokens=(0, 2), qkv=(1,), attn=(1, -2), embed=True))
        torch.testing.assert_close(clip.run_block(0, out.embed)[0], out.tokens[0])  # embed = block 0's input
        # the collected pass gives the same last-block input (explicit blocks vs open_clip's fused blocks)
        torch.testing.assert_close(out.x, plain.x, rtol=1e-5, atol=1e-5)
        assert sorted(out.tokens) == [0, 2] and sorted(out.qkv) == [1] and sorted(out.attn) == [1, 2]
        # block 1 recomputed by hand from block 0's output reproduces the collected q/k/v, weights and tokens
        x0 = out.tokens[0]
        blk = clip.block(1)
        y = blk.ln_1(x0)
        qkv = F.linear(y, blk.attn.in_proj_weight, blk.attn.in_proj_bias)
        q, k, v = (clip.heads(t) for t in qkv.chunk(3, dim=-1))
        for got, want in zip(out.qkv[1], (q, k, v)):
            torch.testing.assert_close(got, want)
        a = torch.softmax(q @ k.transpose(-2, -1) / (q.shape[-1] ** 0.5), dim=-1)
        torch.testing.assert_close(out.attn[1], a)
        torch.testing.assert_close(out.attn[1].sum(-1), torch.ones(a.shape[:-1]))
        x1 = x0 + clip.attn_out(1, a @ v)
        x1 = x1 + clip.ffn(1, x1)
        lnd = not getattr(clip.visual.transformer, "batch_first", False)  # open_clip's own block layout
        ref = blk(x0.transpose(0, 1)).transpose(0, 1) if lnd else blk(x0)
        torch.testing.assert_close(ref, x1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(clip.run_block(2, x1)[0], out.tokens[2], rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInputError, match="last one belongs to the strategy"):
        clip.forward_intermediates(x, Collect(tokens=(3,)))


def test_vfm_hooks_match_timm():
    vfm = create_vfm("dino_b8", "random", model_kwargs=TINY_DINO)
    x = torch.randn(1, 3, 64, 48, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        out = vfm.forward_intermediates(x, Collect(tokens=(0,), qkv=(-1,), attn=(1,)))
        torch.testing.assert_close(vfm.tokens_to_map(out.x, out.grid), vfm.forward_features(x), rtol=1e-5, atol=1e-5)
        blk = vfm.vit.blocks[1]
        t0 = out.tokens[0]
        b, t, c = t0.shape
        qkv = blk.attn.qkv(blk.norm1(t0)).reshape(b, t, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        for got, want in zip(out.qkv[1], (q, k, v)):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(out.attn[1], torch.softmax(q @ k.transpose(-2, -1) * blk.attn.scale, dim=-1))
        torch.testing.assert_close(blk(t0), vfm.vit.blocks[1](t0))


def test_options_are_checked_against_the_method():
    with pytest.raises(InvalidTypeError, match="method 'naclip' has no option 'beta'"):
        make_segmenter("naclip", beta=1.0)
    with pytest.raises(InvalidTypeError, match="did you mean 'sigma'"):
        make_segmenter("naclip", sigmaa=1.0)
    with pytest.raises(InvalidInputError, match="sigma must be > 0"):
        make_segmenter("naclip", sigma=0)
    p = get_method("proxyclip")
    assert (p.beta, p.gamma, p.keep_diagonal) == (1.2, 3.0, True)  # the strategy's declared defaults
    assert "beta" not in p.options  # ...not copied into the preset
    n = get_method("naclip").replace(attention="proxy", vfm="dino_b8")  # the params follow the attention
    assert n.beta == 1.2 and "sigma" not in n.option_names()


class _Scaled(DenseStrategy):
    """A third-party strategy with a parameter MethodCfg has never heard of."""

    name = "test_scaled_values"
    doc = "values of the last block, times a temperature"
    params = (Param("temperature", 2.0, "a factor", positive),)

    def forward(self, model, crops, context):
        from ovseg.attention import get_attention

        feats = model.clip.forward_dense(crops, get_attention("maskclip"), residual=False, ffn=False)
        return feats * self.options["temperature"]


def test_third_party_strategy_needs_no_edit_of_the_config(rgb_image):
    register_strategy(_Scaled)
    register_method(MethodCfg("test_scaled", "test_scaled_values", description="test"))
    try:
        seg = make_segmenter("test_scaled", temperature=3.0)
        assert seg.strategy.options == {"temperature": 3.0} and seg.cfg.temperature == 3.0
        res = seg.predict(rgb_image, LABELS)
        assert res.label_map.shape == rgb_image.shape[:2]
        seg.configure(temperature=5.0)
        assert seg.strategy.options["temperature"] == 5.0
        with pytest.raises(InvalidTypeError, match="did you mean 'temperature'"):
            seg.configure(temprature=1.0)
    finally:
        METHODS.unregister("test_scaled")
        STRATEGIES.unregister("test_scaled_values")


def test_configure_is_atomic(rgb_image):
    seg = make_segmenter("naclip", pamr_steps=0)
    before = seg.predict(rgb_image, LABELS, return_logits=True)
    cfg = seg.cfg
    with pytest.raises(InvalidInputError, match="sigma"):
        seg.configure(window=112, stride=56, sigma=-1.0)  # the bad value comes last
    with pytest.raises(InvalidInputError, match="templates|template"):
        seg.configure(threshold=0.5, templates="no placeholder")
    assert seg.cfg is cfg and seg.strategy.options["sigma"] == 5.0
    after = seg.predict(rgb_image, LABELS, return_logits=True)
    np.testing.assert_array_equal(before.logits, after.logits)
    seg.configure(sigma=2.0, window=112, stride=112)
    assert seg.cfg.sigma == 2.0 and seg.cfg.window == (112, 112) and seg.strategy.options["sigma"] == 2.0


def test_to_is_atomic(monkeypatch):
    seg = make_segmenter("clearclip")
    with pytest.raises(InvalidInputError, match="xpu"):
        seg.to("xpu")
    assert seg.device == torch.device("cpu")
    real_to = torch.nn.Module.to
    calls = []

    def failing_to(self, *args, **kwargs):  # the first move fails half-way (e.g. out of memory on the GPU)
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("simulated out of memory")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(type(seg.model), "to", failing_to)
    with pytest.raises(RuntimeError, match="simulated"):
        seg.to("cpu:0")
    monkeypatch.undo()
    # the Segmenter keeps its device and moved every part back there
    assert seg.device == torch.device("cpu") and calls == [(torch.device("cpu", 0),), (torch.device("cpu"),)]


def test_head_area_filter_and_threshold_by_hand():
    # 3 classes on 10 pixels: argmax areas 6 (class 0), 3 (class 1), 1 (class 2) -> class 2 has 1/4 of non-bg
    scores = torch.tensor([[.6] * 6 + [.2] * 3 + [.3],
                           [.3] * 6 + [.7] * 3 + [.2],
                           [.1] * 6 + [.1] * 3 + [.5]])
    head = Head(area_threshold=0.3)
    counts = head.area_counts(scores)
    assert counts.tolist() == [6, 3, 1]
    dropped = head.dropped_classes(counts)
    assert dropped.tolist() == [False, False, True]  # 1 <= 0.3 * 4; class 1: 3 > 1.2 kept
    labels, best = head.classify(scores, dropped)
    assert labels.tolist() == [0] * 6 + [1] * 3 + [0] and best[-1].item() == pytest.approx(0.3)
    labels, _ = Head(threshold=0.55).classify(scores)
    assert labels.tolist() == [0] * 6 + [1] * 3 + [0]  # 0.5 < 0.55 -> class 0
    # synonyms: max over a class's queries after the softmax over all queries
    logits = torch.tensor([[0.1, 0.5], [0.3, 0.0], [0.2, 0.4]])  # queries: class 0, class 1, class 1
    p = torch.softmax(logits * 40, dim=0)
    torch.testing.assert_close(class_scores(logits, (0, 1, 1), 2, 40.0), torch.stack([p[0], p[1:].max(0).values]))


def test_tensor_paths_equal_predict(rgb_image):
    seg = make_segmenter("naclip")
    res = seg.predict(rgb_image, LABELS, return_logits=True)
    lg = seg.predict_logits(rgb_image, LABELS)
    lm = seg.predict_label_map(rgb_image, LABELS)
    assert isinstance(lg, torch.Tensor) and lg.shape == (4,) + rgb_image.shape[:2]
    np.testing.assert_array_equal(lg.numpy(), res.logits)
    np.testing.assert_array_equal(lm.numpy(), res.label_map)
    assert res.probs is None and res.score.shape == rgb_image.shape[:2]  # full probabilities only on request


def test_progress_shows_post_processing(rgb_image, capsys):
    seg = make_segmenter("naclip")
    seg.predict(rgb_image, LABELS, progress=True)
    err = capsys.readouterr().err
    assert "windows" in err and "post-processing" in err


class _ToyCLIP(torch.nn.Module):
    """A CLIP that is not an open_clip model: a strided conv as image tower, a bag of characters as text tower."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.arch, self.weights, self.activation = "toy-clip", "random", "none"
        self.patch_size, self.base_grid, self.width, self.num_heads, self.num_blocks, self.embed_dim = \
            (16, 16), (14, 14), 8, 1, 1, 8
        self.conv = torch.nn.Conv2d(3, 8, 16, 16)
        self.emb = torch.nn.Embedding(128, 8)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.emb.weight.copy_(torch.randn(self.emb.weight.shape, generator=g))

    def grid_size(self, h, w):
        return h // 16, w // 16

    def forward_intermediates(self, x, collect=None):
        raise NotImplementedError

    def forward_dense(self, x, strategy, **_):
        return self.conv(x)

    def qkv(self, i, y, needs="qkv"):
        raise NotImplementedError

    def attn_out(self, i, o):
        raise NotImplementedError

    def ffn(self, i, x):
        raise NotImplementedError

    def project(self, x):
        return x

    def tokenize(self, texts):
        return torch.tensor([[min(ord(c), 127) for c in t[:20].ljust(20)] for t in texts])

    def encode_text(self, tokens):
        return self.emb(tokens).mean(1)


def test_a_clip_that_is_not_open_clip_can_be_registered(rgb_image):
    register_clip("toy-clip", lambda weights=None, seed=0, model_kwargs=None: _ToyCLIP(seed), doc="test")
    try:
        assert isinstance(_ToyCLIP(), CLIPBackbone)
        seg = Segmenter("clip", clip="toy-clip", clip_weights="random", templates="single")
        res = seg.predict(rgb_image, LABELS)
        assert res.label_map.shape == rgb_image.shape[:2] and set(np.unique(res.label_map)) <= {0, 1, 2}
    finally:
        CLIPS.unregister("toy-clip")


@pytest.mark.parametrize("method", list_methods())
def test_dense_model_contract(method):
    """Every preset's model: unit-norm (N, E, h, w) features, declared VFMs present, a batch equal to one-by-one."""
    seg = make_segmenter(method)
    model = seg.model
    assert set(model.vfms) == set(seg.cfg.vfm_names())
    text = seg.text_embeddings(LABELS)
    crops = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        feats = model(crops, text=text)
        logits = model.window_logits(crops, text)
        assert feats.dim() == 4 and feats.shape[:2] == (2, seg.clip.embed_dim)
        torch.testing.assert_close(feats.norm(dim=1), torch.ones(2, *feats.shape[2:]))
        assert logits.shape == (2, len(text)) + feats.shape[2:]
        for i in range(2):
            torch.testing.assert_close(model(crops[i:i + 1], text=text)[0], feats[i], rtol=1e-5, atol=1e-5)
