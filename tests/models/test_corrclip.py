"""CorrCLIP through the Segmenter (small configs of the real architectures, seeded weights): the official code's
numbers end to end, the region-scoped attention and region tokens seen from inside the strategy, the vote, every
form of user masks, batches, determinism, option checks and the mask generator's size cap."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ovseg.segmenter as segmod
from ovseg import Segmenter
from ovseg.errors import InvalidInputError, InvalidTypeError
from ovseg.masks import MASK_GENERATORS, MaskGenerator, paint_by_area, register_mask_generator
from ovseg.ops import corrclip as cc
from ovseg.strategies import WindowContext
from ovseg.strategies import corrclip as strategy_module

from ..conftest import TEST_MASK_GENERATOR, make_segmenter
from .test_ops_corrclip_models import ORACLE_CLIP, ORACLE_DINO, _oracle_case1_image, _seeded_state_dict

LABELS = ["sky; grass", "cat", "sofa"]


def _image(seed=0, h=150, w=210):
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, ((xx + 2 * yy) % 83) * 3.0], -1)
    img[30:90, 40:120] = [230, 40, 50]
    img[100:, 150:] = [30, 200, 90]
    return np.clip(img + rng.randint(0, 12, img.shape), 0, 255).astype(np.uint8)


def _masks(h=150, w=210):
    """Three overlapping boolean masks and the label image they paint to (0 = no mask)."""
    a = np.zeros((h, w), bool)
    a[30:90, 40:120] = True
    b = np.zeros((h, w), bool)
    b[100:, 150:] = True
    c = np.zeros((h, w), bool)
    c[:50, :] = True  # overlaps a; larger, so it wins the overlap
    return [a, b, c], paint_by_area([a, b, c], (h, w))


@pytest.fixture(scope="module")
def seg():
    return make_segmenter("corrclip", short_side=112, window=112, stride=56)


# ---------------------------------------------------------------------------------------------- official numbers
def test_official_numbers_end_to_end(monkeypatch):
    """Segmenter('corrclip') with the official run's seeded weights (official checkpoint layouts), image, masks,
    class file and prob_thd reproduces the official code's full-resolution logits and labels (CorrCLIP v1 on CPU
    in fp32). Measured: max |diff| 1.2e-7 on the logits, 100 % equal labels. The resize is the official run's
    (float bilinear + round; ovseg's uint8 resize is within ±1 grey level and tested elsewhere)."""
    monkeypatch.setattr(segmod, "resize_image", lambda img, size: F.interpolate(
        img[None].float(), size=tuple(size), mode="bilinear", align_corners=False).round().clamp(0, 255)[0])
    seg = Segmenter("corrclip", clip_weights="random", clip_kwargs=ORACLE_CLIP,
                    vfm_weights="random", vfm_kwargs={"model_kwargs": ORACLE_DINO}, mask_generator="none",
                    device="cpu", short_side=250, threshold=0.1)
    seg.clip.model.load_state_dict(_seeded_state_dict(seg.clip.model.state_dict(), seed=1))
    seg.vfm.vit.load_state_dict(_seeded_state_dict(seg.vfm.vit.state_dict(), seed=2))
    img, regions = _oracle_case1_image()
    labels = ["sky; wall; tree", "cat", "dog", "car"]
    logits = seg.predict_logits(img, labels, masks=regions)  # (6 queries, 200, 400)
    pts = ([10, 100, 150, 199], [20, 200, 390, 0])
    official = torch.tensor([[-0.045752, -0.031727, -0.017574, -0.028212, -0.023468, -0.021433],
                             [-0.143434, -0.129401, -0.118195, -0.13672, -0.118184, -0.110397],
                             [0.002582, 0.015488, 0.001473, 0.030161, 0.016956, 0.042257],
                             [-0.140241, -0.117198, -0.092549, -0.133955, -0.103, -0.121446]])
    # the values are rounded to 1e-6; fp32 differences across CPU kernels stay below 1e-6 on these cosines
    torch.testing.assert_close(logits[:, pts[0], pts[1]].T, official, rtol=0, atol=3e-6)
    n = img.shape[0] * img.shape[1]
    for vote, counts in ((True, [30151, 0, 0, 49849]), (False, [34544, 0, 451, 45005])):
        seg.configure(vote=vote)
        pred = torch.from_numpy(seg.predict(img, labels, masks=regions).label_map.astype(np.int64))
        got = torch.bincount(pred.flatten(), minlength=4)
        # the official code's label counts (the vote changes 5252 pixels); a pixel whose two best classes are
        # within float rounding could flip on another CPU, hence 0.1 % slack
        assert (got - torch.tensor(counts)).abs().sum() <= 1e-3 * n, (vote, got.tolist())
        if vote:
            assert pred[pts].tolist() == [0, 3, 3, 0]


# ---------------------------------------------------------------------------------------------- inside the strategy
def test_attention_and_region_tokens_follow_the_region_map(seg, monkeypatch):
    """With merging off, the scope attention lets two tokens of different regions (neither unsegmented) never
    mix, every row sums to 1, and each region class token sees CLS and its own region's patches only."""
    seen = {}
    real_scope, real_allow = cc.scope_attention, cc.region_token_allow
    monkeypatch.setattr(strategy_module.cc, "scope_attention",
                        lambda f, r, **kw: seen.setdefault("scope", (r.clone(), real_scope(f, r, **kw)))[1])
    monkeypatch.setattr(strategy_module.cc, "region_token_allow",
                        lambda r: seen.setdefault("allow", (r.clone(), real_allow(r)))[1])
    seg.configure(merge=False)
    try:
        crops = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(4))
        regions = torch.zeros(2, 1, 112, 112, dtype=torch.int64)
        regions[0, 0, :56] = 5
        regions[0, 0, 56:, 60:] = 9
        regions[1, 0] = 3
        regions[1, 0, 20:80, 10:50] = 4  # window 1 has no 0: its smallest id 3 is "unsegmented"
        with torch.inference_mode():
            seg.model(crops, context=WindowContext(aux={"regions": regions}))
    finally:
        seg.configure(merge=True)
    r_vfm, attn = seen["scope"]
    assert torch.equal(r_vfm, cc.resize_region_map(regions[:, 0], (14, 14)))  # nearest, unmerged
    r = r_vfm.flatten(1)
    u = r == r.amin(dim=1, keepdim=True)
    other = (r[:, :, None] != r[:, None, :]) & ~u[:, :, None] & ~u[:, None, :]
    assert other.any() and bool((attn[other] == 0).all())
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 196))
    r_clip, (allow, valid, index) = seen["allow"]
    assert torch.equal(r_clip, cc.resize_region_map(r_vfm, (7, 7)))
    for b in range(2):
        ids = torch.unique(r_clip[b])
        assert int(valid[b].sum()) == len(ids)
        for k, rid in enumerate(ids.tolist()):
            assert bool(allow[b, k, 0])  # CLS
            assert torch.equal(allow[b, k, 1:], r_clip[b].flatten() == rid)


def test_vote_makes_every_region_one_label(seg):
    img = _image()
    _, regions = _masks()
    voted = seg.predict(img, LABELS, masks=regions).label_map
    for rid in torch.unique(regions).tolist()[1:]:  # the smallest id (0) is not voted
        assert len(np.unique(voted[regions.numpy() == rid])) == 1
    seg.configure(vote=False)
    try:
        raw = torch.from_numpy(seg.predict(img, LABELS, masks=regions).label_map.astype(np.int64))
    finally:
        seg.configure(vote=True)
    assert torch.equal(cc.region_vote(raw, regions).int(), torch.from_numpy(voted))  # post-processing = the vote


def test_every_mask_form_and_no_generator_call(seg, monkeypatch):
    img = _image()
    bools, regions = _masks()
    calls = []
    monkeypatch.setattr(seg.strategy, "generate_regions", lambda *a, **k: calls.append(1))
    want = seg.predict(img, LABELS, masks=regions, return_logits=True)
    anns = [{"segmentation": m, "area": int(m.sum())} for m in bools]
    for form in (bools, np.stack(bools), anns, regions.numpy().astype(np.uint8)):
        res = seg.predict(img, LABELS, masks=form, return_logits=True)
        np.testing.assert_array_equal(res.logits, want.logits)
        np.testing.assert_array_equal(res.label_map, want.label_map)
    assert not calls  # given masks: the generator never runs


def test_batch_equals_one_by_one_and_is_deterministic(seg):
    a, b = _image(0), _image(1, 140, 230)
    _, ma = _masks()
    batch = seg.predict([a, b], LABELS, masks=[ma, None], return_logits=True)  # None: b's masks are generated
    one = [seg.predict(a, LABELS, masks=ma, return_logits=True), seg.predict(b, LABELS, return_logits=True)]
    for x, y in zip(batch, one):
        np.testing.assert_allclose(x.logits, y.logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(x.label_map, y.label_map)
    again = seg.predict(b, LABELS, return_logits=True)
    np.testing.assert_array_equal(again.logits, one[1].logits)


def test_options_are_validated_and_configure_is_atomic():
    with pytest.raises(InvalidTypeError, match="did you mean 'tau'"):
        make_segmenter("corrclip", tua=2.0)
    with pytest.raises(InvalidInputError, match="eps must be >= 0"):
        make_segmenter("corrclip", eps=-0.1)
    with pytest.raises(ValueError, match="did you mean 'sam2_hiera_l'"):
        make_segmenter("corrclip", mask_generator="sam2_hira_l")
    with pytest.raises(InvalidTypeError, match="mask_kwargs must be a mapping"):
        make_segmenter("corrclip", mask_kwargs=[("points_per_side", 8)])
    seg = make_segmenter("corrclip", short_side=112, window=112, stride=56, mask_generator="none")
    assert seg.strategy.mask_generator is None
    with pytest.raises(InvalidInputError, match="CorrCLIP needs region masks"):
        seg.predict(_image(), LABELS)
    seg.configure(mask_generator=TEST_MASK_GENERATOR)  # builds the generator now
    assert isinstance(seg.strategy.mask_generator, MaskGenerator)
    gen = seg.strategy.mask_generator
    with pytest.raises(InvalidInputError, match="tau must be > 0"):
        seg.configure(mask_generator="none", tau=0)
    assert seg.strategy.mask_generator is gen and seg.cfg.mask_generator == TEST_MASK_GENERATOR
    assert seg.predict(_image(), LABELS).label_map.shape == (150, 210)
    with pytest.raises(InvalidInputError, match="spatial_blocks must lie in 0..4"):
        seg.configure(spatial_blocks=(2, 5)).predict(_image(), LABELS)
    with pytest.raises(InvalidInputError, match="does not use region masks"):
        make_segmenter("naclip").predict(_image(), LABELS, masks=_masks()[1])


def test_spatial_blocks_default_is_the_official_rule(seg):
    assert seg.strategy.spatial_blocks(12) == (5, 6, 7, 8, 9)  # ViT-B: NUM_SPATIAL 5
    assert seg.strategy.spatial_blocks(24) == tuple(range(10, 22))  # ViT-L: 12
    assert seg.strategy.spatial_blocks(6) == (2, 3)  # the tests' 6-block CLIP: L - 4


def test_mask_generator_sees_a_capped_image():
    """Images larger than mask_max_side are downscaled for the generator; its map comes back at full size."""
    shapes = []

    class Spy(MaskGenerator):
        def generate(self, image):
            shapes.append(image.shape)
            out = torch.zeros(image.shape[:2], dtype=torch.int64)
            out[: image.shape[0] // 2] = 1
            out[:, : image.shape[1] // 3] += 2
            return out

    register_mask_generator("test_spy", lambda weights=None, seed=0: Spy(), doc="tests")
    try:
        seg = make_segmenter("corrclip", mask_generator="test_spy", mask_max_side=64, short_side=112, window=112,
                             stride=56)
        img = _image(2, 150, 210)
        regions = seg.strategy.generate_regions(img)
        assert shapes == [(46, 64, 3)] and regions.shape == (150, 210)
        small = Spy().generate(np.zeros((46, 64, 3), np.uint8))
        assert torch.equal(regions, cc.resize_region_map(small[None], (150, 210))[0])
        seg.configure(mask_max_side=0)  # 0: never downscale
        assert seg.strategy.generate_regions(img).shape == (150, 210) and shapes[-1] == (150, 210, 3)
    finally:
        MASK_GENERATORS.unregister("test_spy")


def test_other_vfms_and_precisions_run():
    """A VFM with register tokens (DINOv2: prefix = CLS + 4) and bf16 autocast give finite unit features."""
    crops = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(5))
    for kw in ({"vfm": "dinov2_b14_reg"}, {"precision": "bf16"}):
        seg = make_segmenter("corrclip", **kw)
        with torch.inference_mode():
            feats = seg.forward_features(crops)
        assert torch.isfinite(feats).all() and feats.shape[:2] == (1, seg.clip.embed_dim)
        torch.testing.assert_close(feats.norm(dim=1), torch.ones(feats.shape[0], *feats.shape[2:]))
