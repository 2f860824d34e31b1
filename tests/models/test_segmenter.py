"""End to end with seeded random weights: every method, sizes, determinism, batching, options, errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from ovseg import SegmentationResult, Segmenter, list_methods

from ..conftest import TINY_CLIP, make_segmenter

LABELS = ["cat", "sofa; couch", "floor", "wall"]


@pytest.fixture(scope="module")
def segmenters():
    return {m: make_segmenter(m) for m in list_methods()}


@pytest.mark.parametrize("method", ["clip", "maskclip", "sclip", "clearclip", "naclip", "proxyclip"])
def test_every_method_end_to_end(segmenters, rgb_image, method):
    seg = segmenters[method]
    res = seg.predict(rgb_image, LABELS, return_probs=True)
    assert isinstance(res, SegmentationResult)
    assert res.label_map.shape == rgb_image.shape[:2] and res.label_map.dtype == np.int32
    assert res.probs.shape == (4,) + rgb_image.shape[:2] and res.probs.dtype == np.float32
    assert res.labels == ["cat", "sofa", "floor", "wall"]
    assert res.label_map.min() >= 0 and res.label_map.max() < 4
    np.testing.assert_allclose(res.probs.sum(0), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(res.label_map, res.probs.argmax(0))
    np.testing.assert_array_equal(res.score, res.probs.max(0))  # the chosen label's probability
    again = seg.predict(rgb_image, LABELS, return_probs=True)
    np.testing.assert_array_equal(res.label_map, again.label_map)
    np.testing.assert_array_equal(res.probs, again.probs)
    assert np.asarray(res.overlay()).shape == rgb_image.shape


@pytest.mark.parametrize("method", ["naclip", "proxyclip"])
def test_batch_equals_one_by_one(segmenters, rgb_image, method):
    seg = segmenters[method]
    other = np.ascontiguousarray(rgb_image[::-1, :200])  # a different size
    batch = seg.predict([rgb_image, other, rgb_image], LABELS, return_probs=True)
    for img, res in zip([rgb_image, other, rgb_image], batch):
        single = seg.predict(img, LABELS, return_probs=True)
        np.testing.assert_allclose(res.probs, single.probs, rtol=1e-4, atol=1e-5)
        assert (res.label_map == single.label_map).mean() > 0.999


def test_input_kinds_agree(segmenters, rgb_image, tmp_path):
    seg = segmenters["sclip"]
    ref = seg.predict(rgb_image, LABELS)
    path = tmp_path / "img.png"
    Image.fromarray(rgb_image).save(path)
    for src in (str(path), path, Image.fromarray(rgb_image)):
        np.testing.assert_array_equal(seg.predict(src, LABELS).label_map, ref.label_map)
    t = torch.from_numpy(rgb_image).permute(2, 0, 1).float() / 255.0
    res_t = seg.predict(t, LABELS)
    assert (res_t.label_map == ref.label_map).mean() > 0.99  # float input skips the uint8 re-quantisation
    res_b = seg.predict(t[None].repeat(2, 1, 1, 1), LABELS)
    assert isinstance(res_b, list) and len(res_b) == 2


def test_text_cache_second_call_encodes_nothing(rgb_image):
    seg = make_segmenter("clearclip")
    calls = []
    orig = seg.clip.encode_text
    seg.clip.encode_text = lambda tokens: calls.append(len(tokens)) or orig(tokens)
    seg.predict(rgb_image, LABELS)
    assert calls and sum(calls) == 5  # 5 queries x 1 template
    seg.predict(rgb_image, LABELS)
    seg.predict(rgb_image[:50, :60], LABELS)
    assert sum(calls) == 5 and seg.text.cache_info()["hits"] == 2
    seg.predict(rgb_image, ["cat", "dog"])
    assert sum(calls) == 6  # embeddings are kept per query: "cat" is known, only "dog" is encoded


def test_synonyms_score_max_over_synonyms(segmenters, rgb_image):
    seg = segmenters["clip"]
    res = seg.predict(rgb_image, ["a", "b; c", "d"], return_logits=True, return_probs=True)
    p = torch.softmax(torch.from_numpy(res.logits) * 40.0, dim=0)
    scores = torch.stack([p[0], torch.maximum(p[1], p[2]), p[3]])
    np.testing.assert_allclose(res.probs, (scores / scores.sum(0)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(res.label_map, scores.argmax(0).numpy())


def test_threshold_moves_low_confidence_pixels_to_first_label(segmenters, rgb_image):
    seg = segmenters["clip"]
    base = seg.predict(rgb_image, LABELS, return_logits=True, return_probs=True)
    high = seg.predict(rgb_image, LABELS, threshold=0.99)
    best = base.probs.max(0)  # here no label has synonyms except 'sofa'; use raw scores
    p = torch.softmax(torch.from_numpy(base.logits) * 40.0, 0)
    raw = torch.stack([p[0], torch.maximum(p[1], p[2]), p[3], p[4]]).max(0).values.numpy()
    low = raw < 0.99
    assert low.any() and (high.label_map[low] == 0).all()
    np.testing.assert_array_equal(high.label_map[~low], base.label_map[~low])
    assert best.shape == base.label_map.shape


def test_whole_image_mode_and_option_overrides(rgb_image):
    seg = make_segmenter("naclip", window=0, pamr_steps=0, sigma=3.0, logit_scale=50)
    assert seg.cfg.window is None and seg.cfg.sigma == 3.0 and seg.cfg.logit_scale == 50
    res = seg.predict(rgb_image, LABELS)
    assert res.label_map.shape == rgb_image.shape[:2]


def test_proxyclip_windows_are_padded_to_56_and_use_the_vfm_grid(rgb_image):
    seg = make_segmenter("proxyclip")
    shapes = []
    record = lambda mod, args, out: shapes.append((tuple(args[0].shape), tuple(out.shape)))  # noqa: E731
    handle = seg.model.register_forward_hook(record)  # the dense model is a plain nn.Module: hooks just work
    seg.predict(rgb_image, LABELS)  # 181x263 -> short side 336: 336x488 -> windows 336x336
    handle.remove()
    assert {s[0][1:] for s in shapes} == {(3, 336, 336)}
    assert {s[1][2:] for s in shapes} == {(42, 42)}  # DINO /8 grid, not the CLIP /16 grid
    seg2 = make_segmenter("proxyclip", short_side=100)  # image 100x145 < window: padded to 112x168
    shapes.clear()
    seg2.model.register_forward_hook(record)
    res = seg2.predict(rgb_image, LABELS)
    assert [s[0] for s in shapes] == [(1, 3, 112, 168)] and res.label_map.shape == rgb_image.shape[:2]


def test_non_square_windows_work_for_proxy(rgb_image):
    seg = make_segmenter("proxyclip", window=(224, 336), stride=(112, 112))
    res = seg.predict(rgb_image, LABELS, return_probs=True)
    assert res.label_map.shape == rgb_image.shape[:2] and np.isfinite(res.probs).all()


def test_uniform_image_gives_no_nan_with_proxy():
    seg = make_segmenter("proxyclip")
    res = seg.predict(np.full((200, 300, 3), 128, np.uint8), LABELS, return_probs=True)
    assert np.isfinite(res.probs).all()


def test_pamr_is_applied_for_naclip(rgb_image):
    on = make_segmenter("naclip")
    off = make_segmenter("naclip", pamr_steps=0)
    a = on.predict(rgb_image, LABELS, return_logits=True)
    b = off.predict(rgb_image, LABELS, return_logits=True)
    assert not np.allclose(a.logits, b.logits)
    from ovseg.pamr import pamr
    from ovseg.preprocess import normalize_clip, rescale_size, resize_image

    img = torch.from_numpy(rgb_image).permute(2, 0, 1)
    x = normalize_clip(resize_image(img, rescale_size(*rgb_image.shape[:2], 336)).float())
    # PAMR divides by the local std, so flat regions amplify float rounding: resize with the same routine
    # (ovseg.tiling.resize_rows == F.interpolate bilinear up to rounding, tested in unit/test_tiling.py)
    from ovseg.tiling import resize_rows

    x0 = resize_rows(x, rgb_image.shape[:2], 0, rgb_image.shape[0])[None]
    ref = pamr(x0, torch.from_numpy(b.logits)[None], steps=10, dilations=(8, 16))[0]
    np.testing.assert_allclose(a.logits, ref.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,exc,needle", [
    (dict(method="nacllip"), ValueError, "did you mean 'naclip'"),
    (dict(method="naclip", vfm="dino_b8"), ValueError, "does not use a VFM"),
    (dict(method="proxyclip", vfm="dino_b9"), ValueError, "did you mean 'dino_b8'"),
    (dict(method="naclip", window=224, stride=448), ValueError, "larger than window"),
    (dict(method="naclip", stride=0), ValueError, "positive"),
    (dict(method="naclip", precision="fp8"), ValueError, "fp8"),
    (dict(method="naclip", clip="ViT-B-61"), ValueError, "did you mean 'ViT-B-16'"),
    (dict(method="naclip", bogus=1), TypeError, "bogus"),
])
def test_bad_options(kwargs, exc, needle):
    method = kwargs.pop("method")
    kwargs.setdefault("clip_weights", "random")
    kwargs.setdefault("clip_kwargs", TINY_CLIP)
    kwargs.setdefault("vfm_weights", "random") if method == "proxyclip" else None
    with pytest.raises(exc) as e:
        Segmenter(method, **kwargs)
    assert needle in str(e.value)


def test_bad_inputs(segmenters):
    seg = segmenters["clip"]
    with pytest.raises(ValueError, match="empty"):
        seg.predict(np.zeros((50, 50, 3), np.uint8), [])
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        seg.predict("nope.jpg", LABELS)
    with pytest.raises(ValueError, match="NaN"):
        seg.predict(torch.full((3, 40, 40), float("nan")), LABELS)
    with pytest.raises(TypeError, match="float32|uint8"):
        seg.predict(np.zeros((50, 50, 3), np.float32), LABELS)
    with pytest.raises(ValueError, match="size 1x3000 .*smaller than one"):
        seg.predict(np.zeros((1, 3000, 3), np.uint8), LABELS)
    no_resize = make_segmenter("clip", short_side=0)  # 0: keep the input size
    with pytest.raises(ValueError, match="size 10x12 .*smaller than one"):
        no_resize.predict(np.zeros((10, 12, 3), np.uint8), LABELS)
    with pytest.raises(ValueError, match="threshold .* 1.5"):
        seg.predict(np.zeros((50, 50, 3), np.uint8), LABELS, threshold=1.5)


@pytest.mark.slow
def test_full_size_proxyclip_vit_b16_dino_b8():
    """Full-size ViT-B/16 + DINO-B/8: CLIP grid 21x21 and DINO grid 42x42 for a 336 window."""
    seg = Segmenter("proxyclip", clip_weights="random", vfm_weights="random", device="cpu", templates="single")
    grids = []
    orig = seg.clip.forward_intermediates
    seg.clip.forward_intermediates = lambda x, collect=None: grids.append(orig(x, collect).grid) or orig(x, collect)
    img = (np.random.RandomState(0).rand(336, 336, 3) * 255).astype(np.uint8)
    with torch.inference_mode():
        feats = seg.forward_features(torch.randn(1, 3, 336, 336))
    assert feats.shape == (1, 512, 42, 42) and grids[0] == (21, 21)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(1, 42, 42))
    res = seg.predict(img, LABELS)
    assert res.label_map.shape == (336, 336)


@pytest.mark.parametrize("method,precision", [("naclip", "bf16"), ("proxyclip", "fp16")])
def test_low_precision_autocast_runs_and_mostly_agrees(rgb_image, method, precision):
    fp32 = make_segmenter(method, pamr_steps=0)
    low = make_segmenter(method, pamr_steps=0, precision=precision)
    a = fp32.predict(rgb_image, LABELS, return_probs=True)
    b = low.predict(rgb_image, LABELS, return_probs=True)
    assert low.precision == precision and np.isfinite(b.probs).all()
    assert (a.label_map == b.label_map).mean() > 0.9
    assert not np.array_equal(a.probs, b.probs)  # the lower precision path really ran


def test_memory_budget_adapts_the_window_batch(rgb_image):
    seg = make_segmenter("proxyclip", memory_budget=0.05)
    small, big = seg.batch_size_for(112, 112), seg.batch_size_for(336, 336)
    assert small > big >= 1  # larger windows -> fewer per batch
    assert seg.window_bytes(336, 336) > seg.window_bytes(112, 112)
    calls = []
    seg.model.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    res = seg.predict(rgb_image, LABELS, return_probs=True)
    assert max(calls) <= big and sum(calls) == 3  # 336x488 -> 3 windows of 336
    ref = make_segmenter("proxyclip").predict(rgb_image, LABELS, return_probs=True)
    np.testing.assert_allclose(res.probs, ref.probs, rtol=1e-4, atol=1e-5)  # batching changes no result
    with pytest.raises(ValueError, match="memory_budget"):
        make_segmenter("proxyclip", memory_budget=-1)


@pytest.mark.skipif(not __import__("os").environ.get("OVSEG_TEST_COMPILE"),
                    reason="torch.compile takes minutes on CPU; set OVSEG_TEST_COMPILE=1")
def test_compiled_forward_matches_eager(rgb_image):
    eager = make_segmenter("naclip", pamr_steps=0).predict(rgb_image, LABELS, return_probs=True)
    comp = make_segmenter("naclip", pamr_steps=0, compile=True).predict(rgb_image, LABELS, return_probs=True)
    np.testing.assert_allclose(comp.probs, eager.probs, rtol=1e-3, atol=1e-4)


def test_nothing_accumulates_across_calls(rgb_image):
    from ovseg.attention import gaussian as g

    for n in range(40):  # many grids: the Gaussian-window cache stays bounded
        g.gaussian_window((3 + n, 4), 5.0)
    assert len(g._CACHE) <= g._CACHE_SIZE
    seg = make_segmenter("proxyclip")
    seg.text.cache_size = 3
    for i in range(6):
        seg.predict(rgb_image[:60, :80], [f"a{i}", "b"])
    assert seg.text.cache_info()["size"] == 3  # LRU bound
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in seg.model.modules())
    assert hooks == 0


def test_threshold_accepts_numpy_and_torch_scalars(rgb_image):
    seg = make_segmenter("clip", short_side=64)
    ref = seg.predict(rgb_image, ["a", "b", "c"], threshold=0.5).label_map
    for thd in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), np.array(0.5)):
        np.testing.assert_array_equal(seg.predict(rgb_image, ["a", "b", "c"], threshold=thd).label_map, ref)
    with pytest.raises(TypeError, match="boolean"):
        seg.predict(rgb_image, ["a", "b"], threshold=np.bool_(True))
