"""The registered mask generators on Meta's real architectures (small configs, seeded random weights): the region
map is Meta's automatic masks painted by area, release checkpoints load strictly, misfits are named. SAM 2's tests
need Meta's optional ``sam2`` package and are skipped without it."""
import numpy as np
import pytest
import torch

from ovseg.errors import InvalidInputError
from ovseg.masks import create_mask_generator, paint_by_area

# small encoders of the real architectures (the prompt encoder and mask decoder keep Meta's sizes)
TINY_SAM = dict(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])
TINY_SAM2 = {"image_encoder.trunk.embed_dim": 16, "image_encoder.trunk.num_heads": 1,
             "image_encoder.trunk.stages": [1, 1, 2, 1], "image_encoder.trunk.global_att_blocks": [3],
             "image_encoder.neck.backbone_channel_list": [128, 64, 32, 16], "memory_attention.num_layers": 1}
# 2x2 prompts and no thresholds: random weights still give masks (Meta's generator dominates the time on CPU)
FAST = dict(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0)


def _image():
    rng = np.random.RandomState(0)
    img = np.full((40, 56, 3), 60, np.uint8)
    img[8:30, 10:40] = (220, 40, 40)
    return np.clip(img + rng.randint(0, 20, img.shape), 0, 255).astype(np.uint8)


def _check_generator(name, model_kwargs, tmp_path, layout):
    gen = create_mask_generator(name, "random", model_kwargs=model_kwargs, **FAST)
    assert not gen.training and not any(p.requires_grad for p in gen.parameters())
    img = _image()
    with torch.inference_mode():
        anns = gen.amg.generate(img)  # Meta's own output
        regions = gen.generate(img)
    assert anns, "random weights without thresholds should still give masks"
    assert regions.shape == img.shape[:2] and regions.dtype == torch.int64
    want = paint_by_area([a["segmentation"] for a in anns], img.shape[:2], [a["area"] for a in anns])
    assert torch.equal(regions, want)  # CorrCLIP's painting of Meta's masks
    # the release layout loads strictly into a model built with another seed
    path = tmp_path / "release.pt"
    torch.save(layout(gen.model.state_dict()), path)
    other = create_mask_generator(name, str(path), seed=7, model_kwargs=model_kwargs, **FAST)
    for (k, a), b in zip(gen.model.state_dict().items(), other.model.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(InvalidInputError, match="does not fit mask generator"):
        create_mask_generator(name, str(path))  # the full-size architecture
    with pytest.raises(InvalidInputError, match="did you mean 'points_per_side'"):
        create_mask_generator(name, "random", model_kwargs=model_kwargs, points_per_sid=4)
    return gen


def test_sam_automatic_masks(tmp_path):
    pytest.importorskip("segment_anything")
    gen = _check_generator("sam_vit_b", TINY_SAM, tmp_path, lambda sd: sd)  # Meta's SAM files: a plain state dict
    assert gen.settings == dict(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    with pytest.raises(InvalidInputError, match="model_kwargs may set"):
        create_mask_generator("sam_vit_b", "random", model_kwargs={"depth": 2})


def test_sam2_automatic_masks(tmp_path):
    pytest.importorskip("sam2", reason="Meta's sam2 package is not installed (pip install \"ovseg[sam2]\")")
    gen = _check_generator("sam2_hiera_l", TINY_SAM2, tmp_path, lambda sd: {"model": sd})  # SAM 2: {"model": sd}
    # CorrCLIP v1's settings, with this test's overrides; no dynamic multi-mask fall-back (apply_postprocessing off)
    assert gen.settings == dict(FAST, multimask_output=False)
    assert gen.model.sam_mask_decoder.dynamic_multimask_via_stability is False
