"""Trident's strategy end to end with seeded random weights (small configs of the real CLIP, DINO and SAM
architectures): the native SAM grid, batch = one-by-one, determinism, options, the optional ``segment-anything``
dependency, the SAM encoder's chunked global attention, the decoder's weights, and the SAM refinement (band-wise
at full resolution) against the same computation written with ``ovseg.ops.trident`` on whole tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg.errors import InvalidInputError, InvalidTypeError, MissingDependencyError
from ovseg.ops import trident as T
from ovseg.strategies import ImageContext, WindowContext

from ..conftest import TINY_SAM, make_segmenter

LABELS = ["background", "red; crimson", "sky", "grass"]


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """A structured uint8 RGB image: gradients, a red block and seeded noise."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255.0 / w, yy * 255.0 / h, ((xx + yy) % 97) * 2.6], axis=-1)
    img[h // 4:h // 2, w // 4:w // 2] = [250, 30, 30]
    img += rng.uniform(-20, 20, img.shape)
    return img.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def seg():
    # batch_size 4 and window_batch 4: two images of one size share a forward, and CLIP/DINO chunks straddle images
    return make_segmenter("trident", refine=False, batch_size=4, window_batch=4)


def test_native_grid_logits_go_straight_to_the_input_size(seg):
    img = _image(181, 263, 0)
    res = seg.predict(img, LABELS, return_logits=True)
    ctx = seg._prepare(0, img)
    text = seg.text_embeddings(LABELS)
    h, w = ctx.x.shape[-2:]
    with torch.inference_mode():
        feats = seg.model(ctx.x[None], context=WindowContext(text=text, images=[ctx], boxes=[(0, h, 0, w)]))
    # SAM's valid grid of the picture whose sides are the original sides rounded up to the CLIP patch (16)
    ht, wt = T.sam_source_size(181, 263, patch=16)
    assert (ht, wt) == (192, 272)
    grid = T.sam_valid_grid(T.sam_resize_shape(ht, wt, 1024), patch=16)
    assert tuple(feats.shape[-2:]) == grid == (45, 64)
    logits = torch.einsum("nehw,qe->nqhw", feats, text)
    full = F.interpolate(logits, size=(181, 263), mode="bilinear", align_corners=False)[0]
    # one bilinear step from SAM's grid to (H0, W0), never via the resized image (448 x 651); cosines are <= 1,
    # the band-wise resize differs from F.interpolate by a few float32 ulps
    torch.testing.assert_close(torch.from_numpy(res.logits), full, rtol=0, atol=1e-5)
    via_resized = F.interpolate(F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False),
                                size=(181, 263), mode="bilinear", align_corners=False)[0]
    assert (via_resized - full).abs().max() > 1e-3  # the two routes differ: the test can tell them apart


def test_batch_equals_one_by_one_and_is_deterministic(seg):
    a, b = _image(181, 263, 1), _image(150, 200, 2)
    imgs = [a, b, np.ascontiguousarray(a[:, ::-1])]  # a and its mirror share a SAM picture size: one forward
    together = seg.predict(imgs, LABELS, return_logits=True)
    for img, r in zip(imgs, together):
        alone = seg.predict(img, LABELS, return_logits=True)
        assert np.array_equal(alone.label_map, r.label_map)
        np.testing.assert_allclose(alone.logits, r.logits, rtol=0, atol=1e-5)
    again = seg.predict(imgs, LABELS, return_logits=True)
    for r, s in zip(together, again):
        assert np.array_equal(r.label_map, s.label_map) and np.array_equal(r.logits, s.logits)


def test_options_are_validated():
    with pytest.raises(InvalidTypeError, match="did you mean .slide_stride"):
        make_segmenter("trident", slide_strid=112)
    with pytest.raises(InvalidInputError, match="crop"):
        make_segmenter("trident", crop=100)
    with pytest.raises(InvalidInputError, match="coarse_thresh"):
        make_segmenter("trident", coarse_thresh=1.5)


def test_refinement_needs_segment_anything(monkeypatch, seg):
    import ovseg._deps as deps

    real = deps.is_available
    monkeypatch.setattr(deps, "is_available", lambda m: m != "segment_anything" and real(m))
    with pytest.raises(MissingDependencyError, match=r'pip install "ovseg\[sam\]"'):
        make_segmenter("trident")  # refinement on by default: fails before anything is built
    before = dict(seg.strategy.options)
    with pytest.raises(MissingDependencyError, match="refine=False"):
        seg.configure(refine=True)
    assert seg.strategy.options == before  # a failed configure changes nothing


def test_sam_forward_intermediates_equal_timm_encoder():
    from ovseg.backbones import create_vfm

    sam = create_vfm("sam_b16", "random", seed=3, model_kwargs=dict(TINY_SAM, img_size=256))
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    from ovseg.backbones.hooks import Collect

    with torch.inference_mode():
        ref = sam.vit.forward_features(x)
        out = sam.forward_intermediates(x, Collect(qkv=(1,)))
        blk = sam.vit.blocks[1]
        # q, k, v of the global block from its own layers, on the input of that block
        h = sam.vit.blocks[0](sam.vit.norm_pre(sam.vit.patch_embed(x) + sam.vit.pos_embed))
        qkv = blk.attn.qkv(blk.norm1(h).flatten(1, 2)).view(2, 256, 3, 2, -1).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(out.x, ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(out.qkv[1], qkv.unbind(0)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInputError, match="global"):
        sam.forward_intermediates(x, Collect(qkv=(0,)))  # block 0 attends within windows


def test_decoder_loads_from_the_sam_release_file(tmp_path):
    pytest.importorskip("segment_anything", reason="SAM's refinement needs the optional 'segment-anything'")
    from ovseg.backbones import create_vfm
    from ovseg.backbones.sam import build_sam_decoder

    sam = create_vfm("sam_b16", "random", seed=3, model_kwargs=TINY_SAM)
    rand = build_sam_decoder(sam)
    sd = {f"{k}": v.clone() + 1.0 for k, v in rand.state_dict().items()}  # distinct from the seeded values
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(dict(sd, **{"image_encoder.neck.0.weight": torch.zeros(1)}), path)
    sam.weights = str(path)
    loaded = build_sam_decoder(sam)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    torch.save({"image_encoder.neck.0.weight": torch.zeros(1)}, path)
    with pytest.raises(InvalidInputError, match="prompt encoder or mask decoder"):
        build_sam_decoder(sam)


def test_refinement_band_by_band_equals_whole_tensor_ops():
    pytest.importorskip("segment_anything", reason="SAM's refinement needs the optional 'segment-anything'")
    seg = make_segmenter("trident", sam_iou_thresh=0.0, min_area=30, coarse_thresh=0.2)
    strat, model = seg.strategy, seg.model
    h0, w0, c = 230, 310, 4
    rgb = _image(h0, w0, 3)
    g = torch.Generator().manual_seed(5)
    # smooth class probabilities: large connected regions, some pixels below the threshold
    probs = torch.softmax(4 * F.interpolate(torch.randn(1, c, 6, 8, generator=g), size=(h0, w0), mode="bilinear",
                                            align_corners=False)[0], dim=0)  # (C, H0, W0)
    labels = probs.argmax(dim=0)
    calls = []

    def scores_at(size, rows=None):
        calls.append(rows)
        assert tuple(size) == (h0, w0) and rows is not None  # never the whole (C, H0, W0) map at once
        return probs[:, rows[0]:rows[1]]

    ctx = ImageContext(index=0, x=seg._prepare(0, rgb).x, rgb=rgb)
    with torch.inference_mode():
        out = strat.postprocess(model, labels, ctx, scores_at)
        # the same refinement on whole tensors with the ops
        emb = ctx.extra["trident_sam"]
        reg = T.coarse_regions(labels, probs, coarse_thresh=0.2, min_area=30)
        scores = torch.zeros(c, h0, w0)
        for k, pts in reg["points"].items():
            pr = T.prompt_tensors(pts, reg["boxes"][k], reg["probs_down"][k], image_size=(h0, w0),
                                  coarse_thresh=0.2)
            low, iou = strat.sam_decoder(emb["neck"], point_coords=pr["point_coords"],
                                         point_labels=pr["point_labels"], boxes=pr["boxes"],
                                         mask_input=pr["mask_input"])
            keep = iou[:, 0] > 0.0  # sam_iou_thresh
            if not keep.any():
                continue
            ml = T.sam_masks_to_image(low[keep], input_size=emb["input_size"], original_size=emb["picture"],
                                      image_size=(h0, w0))[:, 0]
            scores[k] = T.refined_class_score(ml, probs[k])
        want = T.merge_refinement(scores, labels)
    assert len(reg["points"]) >= 2 and (want != labels).sum() > 100  # the refinement does change labels here
    assert torch.equal(out, want)
    assert all(r is not None for r in calls)


def test_eval_presets_are_valid_options_of_every_trident_preset():
    from ovseg.eval.presets import HARNESS, read_class_file
    from ovseg.eval.published import PAPER_DATASETS, published_for
    from ovseg.eval.runner import _dataset_options
    from ovseg.methods import get_method

    for method in ("trident", "trident_l14", "trident_h14"):
        assert set(PAPER_DATASETS) <= set(HARNESS[method])
        for dataset, preset in HARNESS[method].items():
            opts, _ = _dataset_options(method, dataset, {})
            cfg = get_method(method).replace(**opts)  # validated like the CLI does
            assert cfg.window is None and cfg.short_side == preset.short_side
            assert cfg.strategy_options["slide_stride"] == preset.options["slide_stride"]
            assert read_class_file(preset.class_file, preset.separator).num_classes > 1
    city = _dataset_options("trident", "cityscapes", {})[0]
    assert city["sam_halves"] and city["cos_fac"] == 3.0 and not city["refine_neg_cos"]
    assert not _dataset_options("trident", "ade20k", {})[0]["sam_halves"]  # reset after Cityscapes
    assert published_for("trident", "ViT-B-16", "dino_b16", False)["miou"]["voc21"] == 67.1
    assert published_for("trident_h14", "ViT-H-14", "dino_b16", False)["miou"]["cityscapes"] == 47.6
    assert published_for("trident_l14", "ViT-L-14", "dino_b16", False) is None  # not published
