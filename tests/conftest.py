"""Shared fixtures: tiny configs of the real architectures (open_clip ViT, timm DINO ViT), seeded weights."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch

# The persistent text-embedding cache must never touch the user's real ~/.cache/ovseg: a session-wide temporary
# OVSEG_HOME (also seen by module-scoped fixtures and subprocesses), and a fresh one per test (below).
_SESSION_HOME = tempfile.mkdtemp(prefix="ovseg-test-home-")
os.environ["OVSEG_HOME"] = _SESSION_HOME
atexit.register(shutil.rmtree, _SESSION_HOME, ignore_errors=True)
# precision="auto" would pick bf16 on CPUs with AMX: pin fp32 so results and tolerances do not depend on the CPU
# (tests of "auto" itself unset it)
os.environ["OVSEG_PRECISION"] = "fp32"

# Small configs of the *real* architectures: same code paths, seconds instead of minutes on CPU.
TINY_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=224, layers=3, width=64, patch_size=16, head_width=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
)
TINY_DINO = dict(embed_dim=48, depth=2, num_heads=2)

DEVICE = os.environ.get("OVSEG_TEST_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True)
def _ovseg_home(tmp_path_factory, monkeypatch):
    """Each test starts with an empty OVSEG_HOME (its text-embedding cache), so tests do not see each other's."""
    home = tmp_path_factory.mktemp("ovseg_home")
    monkeypatch.setenv("OVSEG_HOME", str(home))
    return home


@pytest.fixture
def device():
    return DEVICE


TINY_SAM = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=[1])
TINY_SD = {"unet": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, cross_attention_dim=32,
                        attention_head_dim=4, norm_num_groups=8),
           "vae": dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)}


def tiny_vfm_kwargs(name: str) -> dict:
    """Small architecture overrides of a registered VFM's family (timm ViT, SAM, SD)."""
    if name.startswith("sam"):
        return TINY_SAM
    if name.startswith("sd"):
        pytest.importorskip("diffusers")
        return TINY_SD
    return TINY_DINO


# CorrCLIP's spatial branch averages blocks L-2-NS .. L-3 (NS = L-4 for small L): it needs at least 5 blocks
TINY_CLIP_CORRCLIP = dict(TINY_CLIP, vision_cfg=dict(TINY_CLIP["vision_cfg"], layers=6))
TEST_MASK_GENERATOR = "test_colour_bins"


def _register_test_mask_generator():
    """A deterministic, package-free mask generator for the tests of mask-guided methods: each pixel's region is its
    colour bin (3 levels per channel, integer arithmetic, so identical on every CPU); bin 0 (dark) = no mask."""
    from ovseg.masks import MASK_GENERATORS, MaskGenerator, register_mask_generator

    class ColourBins(MaskGenerator):
        name = TEST_MASK_GENERATOR

        def generate(self, image):
            q = np.asarray(image).astype(np.int64) // 86  # (H, W, 3) in 0..2
            return torch.from_numpy(q[..., 0] * 9 + q[..., 1] * 3 + q[..., 2])

    if TEST_MASK_GENERATOR not in MASK_GENERATORS:
        register_mask_generator(TEST_MASK_GENERATOR, lambda weights=None, seed=0: ColourBins(),
                                doc="tests only: regions = colour bins")


_register_test_mask_generator()


def make_segmenter(method: str, **kw):
    """A Segmenter of ``method`` with seeded random weights and small configs of its real architectures: CLIP and
    every VFM role the method uses (unless the caller passes weights or kwargs itself); methods with a mask
    generator get the package-free test generator unless the caller chooses one."""
    from ovseg import Segmenter
    from ovseg.methods import get_method

    preset = get_method(method)
    kw.setdefault("clip_weights", "random")
    kw.setdefault("clip_kwargs", TINY_CLIP_CORRCLIP if preset.strategy == "corrclip" else TINY_CLIP)
    kw.setdefault("templates", "single")
    kw.setdefault("device", DEVICE)
    if "mask_generator" in preset.option_names():
        kw.setdefault("mask_generator", TEST_MASK_GENERATOR)
    cfg = preset.replace(vfm=kw.get("vfm"), vfms=kw.get("vfms"))
    roles = cfg.vfm_names()
    if roles:
        kw.setdefault("vfm_weights", {role: "random" for role in roles})
        kw.setdefault("vfm_kwargs", {role: {"model_kwargs": tiny_vfm_kwargs(name)} for role, name in roles.items()})
    return Segmenter(method, **kw)


@pytest.fixture
def rgb_image():
    """A smooth, structured 8-bit RGB image (odd, non-square size)."""
    h, w = 181, 263
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 / w), (yy * 255 / h), ((xx + yy) % 97) * 2.6], axis=-1)
    img[40:120, 60:150] = [250, 30, 30]
    return img.astype(np.uint8)
