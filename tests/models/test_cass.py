"""CASS as a strategy: the real architectures (small configs, seeded random weights) through the Segmenter.

The per-operation equations are tested in tests/unit/test_ops_cass.py; here: the strategy wires them to the
backbones as the reference does (one CLIP trunk, the VFM's last-block keys of the reference's VFM input, the
unmodified last block's CLS for the prior), batches equal one-by-one, runs are deterministic, options are checked.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg.backbones import Collect
from ovseg.errors import InvalidInputError, InvalidTypeError
from ovseg.ops.cass import cass_attention, cluster_texts, dino_input, presence_logits, presence_prior
from ovseg.strategies.base import ImageContext, WindowContext, cosine_logits

from ..conftest import make_segmenter

LABELS = ["sky", "grass; lawn", "cat", "road", "tree"]
SMALL = dict(short_side=112, window=112, stride=56)


def _image(seed=0, h=120, w=170):
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, ((xx * yy) % 91) * 2.8], axis=-1)
    img[30:80, 40:110] = [40, 200, 60]
    return np.clip(img + rng.randint(0, 20, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def seg():
    torch.manual_seed(0)
    return make_segmenter("cass", **SMALL)


def _crops(n=2, size=(112, 112), seed=3):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _reference_window(seg, crop, text, cls_override=None):
    """The reference's per-window computation written out with the backbones' own modules."""
    clip, vfm, o = seg.clip, seg.model.vfm, seg.strategy.options
    out = clip.forward_intermediates(crop)
    blk = clip.block(-1)
    _, k, v = clip.qkv(-1, blk.ln_1(out.x), "kv")
    vin = dino_input(crop)  # the reference conversion of the CLIP-normalised window
    vo = vfm.forward_intermediates(vin, Collect(qkv=(-1,)))  # full forward; its last block's keys
    vk = vo.qkv[vfm.num_blocks - 1][1][:, :, 1:]
    o_ = cass_attention(None, k, v, grid=out.grid, vfm_keys=vk, vfm_grid=vo.grid, eigenscaling=o["eigenscaling"])
    feats = F.normalize(clip.project(clip.attn_out(-1, o_)), dim=-1)  # (1, L, E)
    full = clip.run_block(-1, out.x)[0]  # the unmodified last block, every token
    cls = clip.project(full[:, :1])[:, 0] if cls_override is None else cls_override
    prior = presence_prior(cls, text)
    lg = presence_logits(feats, text, prior, cluster_texts(text, o["h_threshold"]), alpha=o["alpha"], beta=o["beta"])
    return feats, lg.transpose(1, 2).reshape(1, len(text), *out.grid)


def test_preset_and_defaults():
    from ovseg.methods import get_method

    cfg = get_method("cass")
    assert cfg.vfm_names() == {"vfm": "dino_b8"} and cfg.window == (224, 224) and cfg.stride == (112, 112)
    assert cfg.short_side == 336 and cfg.logit_scale == 40.0 and cfg.pamr_steps == 0 and cfg.threshold == 0.0
    assert (cfg.beta, cfg.alpha, cfg.h_threshold, cfg.eigenscaling) == (0.25, 0.04, 0.09, True)
    assert (cfg.svd, cfg.spectra, cfg.swap_quirk, cfg.matching, cfg.prior_cls) == \
        ("exact", "graph", True, "spectral", "image")
    assert (cfg.rank, cfg.num_eigs, cfg.strength, cfg.sigma) == (10, 20, 10.0, 5.0)
    # the strategy's own defaults are the official constructor's: prior off, eigenscaling off (dataset voc20)
    bare = cfg.strategy_cls.check({})
    assert (bare["beta"], bare["alpha"], bare["h_threshold"], bare["eigenscaling"]) == (0.0, 0.0, 0.0, False)


def test_window_logits_follow_the_reference_equations(seg):
    text = seg.text_embeddings(LABELS)
    crop = _crops(1)
    with torch.inference_mode():
        feats_ref, lg_ref = _reference_window(seg, crop, text)
        feats = seg.model(crop, text=text)  # (1, E, gh, gw)
        lg = seg.model.window_logits(crop, text)  # no image context: the window is its own image
    torch.testing.assert_close(feats.flatten(2).transpose(1, 2), feats_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lg, lg_ref, rtol=1e-5, atol=1e-6)
    # the prior and the adjusted text really act: not the plain cosine of the features
    assert (lg - cosine_logits(feats, text)).abs().max() > 1e-3


def test_prior_off_gives_cosine_logits():
    s = make_segmenter("cass", beta=0.0, alpha=0.0, **SMALL)
    text = s.text_embeddings(LABELS)
    crops = _crops(2)
    with torch.inference_mode():
        torch.testing.assert_close(s.model.window_logits(crops, text), cosine_logits(s.model(crops, text=text), text),
                                   rtol=1e-5, atol=1e-6)


def test_whole_image_cls_is_open_clips_image_embedding(seg):
    """prepare(): CLIP's unmodified forward on the whole resized image (224 x 224: no position interpolation, so
    open_clip's own encode_image is the reference)."""
    x = _crops(1, (224, 224), seed=5)[0]
    img = ImageContext(0, x)
    text = seg.text_embeddings(LABELS)
    with torch.inference_mode():
        seg.strategy.prepare(seg.model, img, text)
        want = seg.clip.model.encode_image(x[None])[0]
        torch.testing.assert_close(img.extra["cass_cls"], want, rtol=1e-5, atol=1e-5)
        # and the windows of that image use it: equal to the reference with that CLS
        crop = x[None, :, :112, :112]
        lg = seg.model.window_logits(crop, text, WindowContext(text=text, images=[img]))
        _, lg_ref = _reference_window(seg, crop, text, cls_override=want[None])
    torch.testing.assert_close(lg, lg_ref, rtol=1e-5, atol=1e-6)


def test_prior_cls_window_differs_from_image(seg):
    img = _image()
    base = seg.predict_logits(img, LABELS)
    seg.configure(prior_cls="window")
    try:
        win = seg.predict_logits(img, LABELS)
    finally:
        seg.configure(prior_cls="image")
    assert (base - win).abs().max() > 1e-4


def test_vfm_keys_use_the_reference_input_and_stop_at_the_last_block(seg):
    vfm = seg.model.vfm
    crops = _crops(2, (112, 150))
    with torch.inference_mode():
        keys, grid = seg.strategy._vfm_keys(seg.model, crops)
        x = dino_input(crops)  # square 112 x 112, ImageNet-normalised
        assert grid == (14, 14) and keys.shape == (2, 2, 196, 24)
        full = vfm.forward_intermediates(x, Collect(qkv=(-1,), tokens=(-2,)))
        torch.testing.assert_close(keys, full.qkv[vfm.num_blocks - 1][1][:, :, 1:])
        stopped = vfm.forward_intermediates(x, Collect(qkv=(-1,), stop=True))
        torch.testing.assert_close(stopped.x, full.tokens[vfm.num_blocks - 2])  # the last block's input
        # not the model's exact un-/re-normalisation of the window (the reference's conversion differs)
        other = vfm.forward_intermediates(seg.model.vfm_input(crops)[..., :112, :112], Collect(qkv=(-1,)))
        assert (other.qkv[vfm.num_blocks - 1][1][:, :, 1:] - keys).abs().max() > 1e-3


def test_stop_skips_the_remaining_blocks(seg):
    vfm = seg.model.vfm
    calls = []
    hooks = [b.register_forward_hook(lambda m, i, o, j=j: calls.append(j)) for j, b in enumerate(vfm.vit.blocks)]
    try:
        with torch.inference_mode():
            vfm.forward_intermediates(dino_input(_crops(1)), Collect(qkv=(0,), stop=True))
    finally:
        for h in hooks:
            h.remove()
    assert calls == []  # block 0's q/k/v only; no block ran as a whole


def test_batch_equals_one_by_one_and_deterministic(seg):
    imgs = [_image(0), _image(1, 130, 150)]
    both = seg.predict_logits(imgs, LABELS)  # windows of both images share batches
    for img, lg in zip(imgs, both):
        torch.testing.assert_close(seg.predict_logits(img, LABELS), lg, rtol=1e-5, atol=1e-6)
    again = seg.predict_logits(imgs, LABELS)
    for a, b in zip(both, again):
        assert torch.equal(a, b)


def test_randomized_svd_is_seeded_per_image():
    s = make_segmenter("cass", svd="randomized", batch_size=3, **SMALL)
    imgs = [_image(0), _image(1, 130, 150)]
    both = s.predict_logits(imgs, LABELS)
    for img, lg in zip(imgs, both):
        # one generator per image, drawn window by window in grid order: the batch composition does not matter
        torch.testing.assert_close(s.predict_logits(img, LABELS), lg, rtol=1e-5, atol=1e-6)
    exact = make_segmenter("cass", **SMALL).predict_logits(imgs[0], LABELS)
    assert 0 < (exact - both[0]).abs().max() < 0.05


def test_whole_image_mode(seg):
    s = make_segmenter("cass", short_side=112, window=0)
    res = s.predict(_image(), LABELS, return_logits=True)
    assert res.label_map.shape == (120, 170) and res.logits.shape == (6, 120, 170)  # 6 queries (a synonym)
    assert torch.isfinite(torch.as_tensor(res.logits)).all()
    # whole-image mode: the whole image's CLS is the window's own (the reference's VOC21 setting)
    s.configure(prior_cls="window")
    torch.testing.assert_close(torch.as_tensor(s.predict(_image(), LABELS, return_logits=True).logits),
                               torch.as_tensor(res.logits), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, err", [
    (dict(svd="fast"), InvalidInputError), (dict(beta=1.5), InvalidInputError),
    (dict(h_threshold=-0.1), InvalidInputError), (dict(prior_cls="crop"), InvalidInputError),
    (dict(rank=0), InvalidInputError), (dict(eigenscaling="yes"), InvalidTypeError),
    (dict(betta=0.1), InvalidTypeError),
])
def test_options_are_validated(seg, bad, err):
    with pytest.raises(err, match=next(iter(bad))):
        seg.configure(**bad)
    assert seg.strategy.options["svd"] == "exact"


def test_needs_text_and_matching_heads(seg):
    with pytest.raises(InvalidInputError, match="needs the text"):
        seg.model(_crops(1))
    # a VFM whose head count differs from CLIP's cannot be matched head by head
    s = make_segmenter("cass", vfm_kwargs={"vfm": {"model_kwargs": dict(embed_dim=48, depth=2, num_heads=3)}},
                       **SMALL)
    with pytest.raises(InvalidInputError, match="heads"):
        s.predict(_image(), LABELS)


def test_text_clusters_are_cached_per_label_set_and_threshold(seg):
    t1 = seg.text_embeddings(LABELS)
    c1 = seg.strategy.clusters(t1)
    assert seg.strategy.clusters(t1.clone()) is c1
    torch.testing.assert_close(c1, cluster_texts(t1, seg.strategy.options["h_threshold"]))
    t2 = seg.text_embeddings(["cat", "dog"])
    assert seg.strategy.clusters(t2).shape == (2,)
