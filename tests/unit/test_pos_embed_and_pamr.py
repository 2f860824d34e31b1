"""Positional-embedding interpolation (docs/methods.md, "Positional embeddings") and PAMR, against independent
references."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg.pamr import pamr
from ovseg.pos_embed import interpolate_pos_embed


def _keys(t, a=-0.75):
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def _bicubic_1d(src, n_out, scale):
    """Independent 1-D resampler with the reference's index rule src=(dst+0.5)/scale-0.5, clamped taps."""
    out = []
    for dst in range(n_out):
        x = (dst + 0.5) / scale - 0.5
        x0 = math.floor(x)
        acc = 0.0
        for tap in range(x0 - 1, x0 + 3):
            acc += _keys(x - tap) * src[min(max(tap, 0), len(src) - 1)]
        out.append(acc)
    return np.array(out)


def test_scale_factor_sampling_positions_14_to_21():
    # separable signal: pos[i, j] = f(i) -> the resize acts on rows only
    g0, g = 14, 21
    f = np.random.RandomState(0).randn(g0)
    pos = torch.tensor(np.repeat(f[:, None], g0, axis=1).reshape(g0 * g0, 1), dtype=torch.float32)
    out = interpolate_pos_embed(pos, (g0, g0), (g, g)).view(g, g)[:, 0].numpy()
    scale = (g + 0.1) / g0
    np.testing.assert_allclose(out, _bicubic_1d(f, g, scale), rtol=1e-5, atol=1e-5)
    # the last output samples source 13.102 (scale-factor rule), not 13.167 (size rule)
    assert (20 + 0.5) / scale - 0.5 == pytest.approx(13.1019, abs=1e-4)
    size_rule = F.interpolate(torch.tensor(f, dtype=torch.float32).view(1, 1, g0, 1).expand(1, 1, g0, 2).contiguous(),
                              size=(g, 2), mode="bicubic", align_corners=False)[0, 0, :, 0].numpy()
    assert not np.allclose(out, size_rule, atol=1e-4)


def test_unchanged_grid_returns_table_and_non_square():
    pos = torch.randn(196, 8)
    assert interpolate_pos_embed(pos, (14, 14), (14, 14)) is pos
    assert interpolate_pos_embed(pos, (14, 14), (20, 27)).shape == (20 * 27, 8)


def _pamr_reference(img, mask, steps, dilations):
    """Straightforward PAMR: stack every neighbour explicitly (Araslanov & Roth's formulation)."""
    def neigh(x, d):
        xp = F.pad(x, (d, d, d, d), mode="replicate")
        h, w = x.shape[-2:]
        return [xp[..., d + dy * d:d + dy * d + h, d + dx * d:d + dx * d + w]
                for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]

    samples = torch.stack([s for d in dilations for s in [img] + neigh(img, d)], dim=2)  # (B, 3, 18, H, W)
    std = samples.std(dim=2, keepdim=True)  # unbiased
    diffs = torch.stack([img - n for d in dilations for n in neigh(img, d)], dim=2)
    aff = (-diffs.abs() / (1e-8 + 0.1 * std)).mean(1)
    aff = torch.softmax(aff, dim=1)
    for _ in range(steps):
        m = torch.stack([n for d in dilations for n in neigh(mask, d)], dim=2)  # (B, Q, 16, H, W)
        mask = (m * aff[:, None]).sum(2)
    return mask


def test_pamr_matches_explicit_reference():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, 3, 40, 37, generator=g)
    mask = torch.randn(1, 4, 40, 37, generator=g)
    torch.testing.assert_close(pamr(img, mask, steps=3, dilations=(2, 4)),
                               _pamr_reference(img, mask, 3, (2, 4)), rtol=1e-4, atol=1e-5)


def test_pamr_preserves_constants_and_respects_edges():
    img = torch.zeros(1, 3, 32, 32)
    img[..., 16:] = 5.0  # strong vertical edge
    const = torch.full((1, 2, 32, 32), 0.3)
    torch.testing.assert_close(pamr(img, const, steps=10, dilations=(8, 16)), const)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:] = 1.0  # aligned with the edge: refinement must not blur it much
    out = pamr(img, mask, steps=10, dilations=(2, 4))
    assert float(out[..., :14].max()) < 0.05 and float(out[..., 18:].min()) > 0.95
