"""SC-CLIP and ResCLIP as dense strategies: the strategies reproduce the official code (literal slices of its
outputs on the tiny integer checkpoint, tests/unit/_tiny_reference_clip.py), batch = one-by-one end to end,
determinism, option checking and the block choice per CLIP depth."""
import numpy as np
import pytest
import torch

from ovseg.errors import InvalidInputError, InvalidTypeError
from ovseg.eval.presets import HARNESS, get_eval_preset
from ovseg.eval.published import published_for
from ovseg.model import DenseModel
from ovseg.strategies import WindowContext, get_strategy
from ovseg.strategies.resclip import rcs_blocks
from ovseg.strategies.scclip import scclip_blocks

from ..conftest import make_segmenter
from ..unit._tiny_reference_clip import build_tiny_clip, integer_text, normalize, synthetic_image
from ..unit.test_ops_resclip import OFFICIAL_TINY, SETTINGS
from ..unit.test_ops_scclip import OFFICIAL_SQUARE, OFFICIAL_TALL, ROWS

LABELS = ["sky", "grass", "cat", "road"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def _model(clip, name, **options):
    return DenseModel(clip, get_strategy(name)(**options)).eval()


def _image(h=150, w=230, seed=0):
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, ((xx * yy) % 91) * 2.8], axis=-1)
    img[h // 4:h // 2, w // 4:w // 2] = [40, 200, 60]
    return np.clip(img + rng.randint(0, 20, img.shape), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ fidelity to the official code
@pytest.mark.parametrize("case", ["square", "tall"])
def test_scclip_strategy_matches_official_code(tiny_clip, case):
    """The strategy's one trunk forward with Collect feeds the same blocks as the official code: its projected
    tokens and window logits equal the official encode_image / forward_feature slices."""
    ref = OFFICIAL_SQUARE if case == "square" else OFFICIAL_TALL
    size = (224, 224) if case == "square" else (224, 160)
    crops = normalize(synthetic_image(*size, seed=0))
    model = _model(tiny_clip, "scclip", reference_positions=True)
    with torch.no_grad():
        feats = model.strategy(model, crops, WindowContext())  # (1, E, gh, gw), not normalised
        logits = model.window_logits(crops, integer_text())  # (1, Q, gh, gw)
    rows = feats.flatten(2).transpose(1, 2)[0, ROWS, :5]
    torch.testing.assert_close(rows, torch.tensor(ref["feats"]), rtol=0, atol=3e-5)  # 12 fp32 blocks: ~2e-6 seen
    up = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    got = torch.stack([up[0, :, 8, 8], up[0, :, 120, 100]])
    torch.testing.assert_close(got, torch.tensor(ref["px"]), rtol=0, atol=2e-6)


def test_scclip_default_repairs_non_square_windows_where_the_anomalies_are(tiny_clip):
    crops = normalize(synthetic_image(224, 160, seed=0))
    with torch.no_grad():
        ours = _model(tiny_clip, "scclip").window_logits(crops, integer_text())
        ref = _model(tiny_clip, "scclip", reference_positions=True).window_logits(crops, integer_text())
        square = normalize(synthetic_image(224, 224, seed=0))
        same = [_model(tiny_clip, "scclip", reference_positions=r).window_logits(square, integer_text())
                for r in (False, True)]
    assert (ours - ref).abs().max() > 1e-4  # misplaced repairs change the logits
    assert torch.equal(same[0], same[1])  # identical on square grids


@pytest.mark.parametrize("base, dataset", sorted(OFFICIAL_TINY))
def test_resclip_strategy_matches_official_code(tiny_clip, base, dataset):
    """RCS maps from Collect(attn=blocks 6-9), both passes and the head: the official encode_image slices."""
    ref = OFFICIAL_TINY[(base, dataset)]
    crops = normalize(synthetic_image(224, 224, 0)) if dataset == "context60" else normalize(
        synthetic_image(176, 200, 5))
    model = _model(tiny_clip, "resclip", base=base, **SETTINGS[dataset])
    with torch.no_grad():
        feats = model.strategy(model, crops, WindowContext(text=integer_text()))  # (1, E, gh, gw)
    tokens = feats.flatten(2).transpose(1, 2)[0]  # patches only; the official rows count the CLS as row 0
    got = tokens[[0, 49, 99, -1], :5]
    torch.testing.assert_close(got, torch.tensor(ref["feats"][1:]), rtol=0, atol=3e-5)


# ------------------------------------------------------------------ end to end with random weights
@pytest.mark.parametrize("method", ["scclip", "resclip", "resclip_sclip", "resclip_clearclip"])
def test_predict_batch_equals_one_by_one_and_is_deterministic(method):
    seg = make_segmenter(method, short_side=160, window=112, stride=56)
    a, b = _image(), _image(170, 130, seed=1)
    together = seg.predict([a, b], LABELS, return_logits=True)
    for img, res in zip((a, b), together):
        alone = seg.predict(img, LABELS, return_logits=True)
        np.testing.assert_allclose(res.logits, alone.logits, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(res.label_map, alone.label_map)
    one_window = make_segmenter(method, short_side=160, window=112, stride=56, batch_size=1)
    again = one_window.predict(a, LABELS, return_logits=True)
    np.testing.assert_allclose(again.logits, together[0].logits, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(seg.predict(a, LABELS).label_map, together[0].label_map)  # deterministic


def test_resclip_uses_the_labels_and_needs_text():
    seg = make_segmenter("resclip")
    crops = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with pytest.raises(InvalidInputError, match="needs the text embeddings"):
        seg.model(crops)
    t1, t2 = seg.text_embeddings(LABELS), seg.text_embeddings(["tree", "car", "water", "wall"])
    with torch.no_grad():
        f1, f2 = seg.model(crops, text=t1), seg.model(crops, text=t2)
        one_pass = make_segmenter("resclip", sfr=False).model
        assert torch.equal(one_pass(crops, text=t1), one_pass(crops, text=t2))  # RCS alone ignores the labels
    assert not torch.equal(f1, f2)  # the second pass depends on the first pass's labels


def test_resclip_bases_are_the_base_methods_without_terms():
    """sclip base with RCS only and λ = 0, τ = 1 is SCLIP's last block: the plug-in keeps the base's maths."""
    crops = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    for base, preset in (("sclip", "sclip"), ("clearclip", "clearclip"), ("naclip", "naclip")):
        seg = make_segmenter("resclip", base=base, rcs=True, rcs_mix=(1.0, 0.0), sfr=False, seed=5)
        ref = make_segmenter(preset, pamr_steps=0, seed=5)
        with torch.no_grad():
            torch.testing.assert_close(seg.model(crops, text=seg.text_embeddings(LABELS)), ref.model(crops),
                                       rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ options and block choice
def test_options_are_validated():
    with pytest.raises(InvalidTypeError, match="no option 'betta'"):
        make_segmenter("scclip", betta=0.4)
    with pytest.raises(InvalidTypeError, match="no option"):
        make_segmenter("resclip", sigma_sfr=5)
    with pytest.raises(InvalidInputError, match="contamination"):
        make_segmenter("scclip", contamination=1.5)
    with pytest.raises(InvalidInputError, match="fusion_layers"):
        make_segmenter("scclip", fusion_layers=(5, 2))
    with pytest.raises(InvalidInputError, match="base must be one of"):
        make_segmenter("resclip", base="proxy")
    with pytest.raises(InvalidInputError, match="tau, lambda"):
        make_segmenter("resclip", rcs_mix=2.0)
    with pytest.raises(InvalidInputError, match="Segmenter\\('naclip'\\)"):
        make_segmenter("resclip", rcs=False, sfr=False)
    seg = make_segmenter("scclip", pre_layer=9)  # the tiny CLIP has 3 blocks: a clear error at the first window
    with pytest.raises(InvalidInputError, match=r"layers \[9\] are not blocks 1..2 of a 3-block CLIP"):
        seg.predict(_image(), LABELS)
    seg = make_segmenter("resclip", rcs_layers=(6, 9))
    with pytest.raises(InvalidInputError, match="within 1..2"):
        seg.predict(_image(), LABELS)


def test_blocks_follow_the_clip_depth():
    assert scclip_blocks(12, {}) == dict(pre_layer=9, post_layer=4, fusion_layers=(4, 10), res_cls=0.3)
    assert scclip_blocks(24, {}) == dict(pre_layer=17, post_layer=7, fusion_layers=(9, 19), res_cls=0.1)
    assert scclip_blocks(3, {}) == dict(pre_layer=2, post_layer=1, fusion_layers=(1, 2), res_cls=0.3)
    assert scclip_blocks(32, {"res_cls": 0.2})["res_cls"] == 0.2
    assert scclip_blocks(32, {})["pre_layer"] == 24
    assert rcs_blocks(12) == rcs_blocks(24) == (5, 6, 7, 8)  # 0-indexed: the official blocks 6-9
    assert rcs_blocks(3) == (1,) and rcs_blocks(12, (2, 3)) == (1, 2)


def test_window_elements_count_the_kept_intermediates():
    for method in ("scclip", "resclip"):
        model = make_segmenter(method).model
        small, large = (model.strategy.window_elements(model, s, s) for s in (112, 224))
        assert 0 < small < large  # grows with the window (quadratically in the tokens)
        assert large > 4 * model.clip.num_heads * (14 * 14) ** 2 // 4


# ------------------------------------------------------------------ evaluation settings
def test_eval_presets_and_published_rows():
    assert get_eval_preset("scclip", "voc21").area_threshold == 0.1
    assert get_eval_preset("scclip", "coco_object").logit_scale == 55.0
    assert get_eval_preset("scclip", "cityscapes").short_side == 560
    for method in ("resclip", "resclip_sclip", "resclip_clearclip"):
        voc = get_eval_preset(method, "voc21")
        assert voc.window is None and voc.options["temp_thd"] == 0.5 and voc.options["sfr_mix"] == (2.2, 0.7)
        for preset in HARNESS[method].values():
            make_segmenter(method, **preset.options)  # every dataset's options are valid for the strategy
    assert published_for("scclip", "ViT-B-16", None, False)["miou"]["voc21"] == 64.6
    assert published_for("resclip", "ViT-B-16", None, False)["miou"]["ade20k"] == 18.0
    assert published_for("resclip_sclip", "ViT-B-16", None, False)["miou"]["voc21"] == 60.7
