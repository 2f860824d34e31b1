"""The documented way to bring a VFM: register a builder returning (B, C, h, w) features."""
import numpy as np
import pytest
import torch

import ovseg
from ovseg.backbones import VFM, VFMS

from ..conftest import make_segmenter


class OneHotRegions(VFM):
    """Features = one-hot of 'left half' vs 'right half' on a 16-px grid: proxy attention then averages
    CLIP values within each half, so each half must get a single label."""

    patch_size, embed_dim = 16, 2

    def forward_features(self, x):
        b, _, h, w = x.shape
        gh, gw = h // 16, w // 16
        right = (torch.arange(gw, device=x.device) >= gw // 2).float().view(1, 1, 1, gw).expand(b, 1, gh, gw)
        return torch.cat([1 - right, right], dim=1)


def test_registered_vfm_drives_proxyclip():
    ovseg.register_vfm("test_halves", lambda weights=None, seed=0: OneHotRegions(), doc="test")
    try:
        assert "test_halves" in ovseg.list_vfms()
        seg = make_segmenter("proxyclip", vfm="test_halves", vfm_kwargs=None, window=0, short_side=0,
                             pad_multiple=0)
        img = (np.random.RandomState(1).rand(64, 128, 3) * 255).astype(np.uint8)
        res = seg.predict(img, ["a", "b", "c", "d", "e"], return_logits=True)
        left, right = res.logits[:, :, :56], res.logits[:, :, 72:]  # away from the bilinear seam
        assert np.allclose(left, left[:, :1, :1], atol=1e-5) and np.allclose(right, right[:, :1, :1], atol=1e-5)
        with pytest.raises(ValueError, match="already registered"):
            ovseg.register_vfm("test_halves", lambda weights=None, seed=0: OneHotRegions())
    finally:
        VFMS.unregister("test_halves")
