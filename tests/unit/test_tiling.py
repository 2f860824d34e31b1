"""Band-wise full-resolution post-processing equals the whole-image computation.

Tolerances are derived from what float32 arithmetic guarantees, not tuned to one CPU: vectorised kernels
(AVX2, AVX-512, AMX, or none) may fuse multiply-adds, order operations differently or use a different ``exp``.
"""
import pytest
import torch
import torch.nn.functional as F

from ovseg.pamr import pamr
from ovseg.tiling import pamr_rows, resize_rows, resize_rows_from, row_bands

EPS = torch.finfo(torch.float32).eps  # 2**-23: one ulp of 1.0


def _ulp(x: float) -> float:
    """Spacing of float32 numbers at |x| (x >= 1)."""
    return float(torch.finfo(torch.float32).eps * 2 ** torch.floor(torch.log2(torch.tensor(float(x)))))


def bilinear_tolerance(x: torch.Tensor, size) -> float:
    """Bound on |resize_rows - F.interpolate| for the same float32 input x (C, h, w) resized to ``size``.

    Per axis, both compute the source coordinate ``scale·(dst + 0.5) - 0.5`` in float32; rounding (with or
    without a fused multiply-add) moves it, and so the interpolation weight, by at most one ulp of the largest
    coordinate (< the input length). A weight error δ changes a lerp of values bounded by m = max|x| by at most
    δ·|x1 - x0| <= 2·m·δ; the lerp itself rounds at most 3 times (a few ulps of m). Two axes add up.
    """
    m = float(x.abs().max())
    h, w = x.shape[-2:]
    return sum(m * (2 * _ulp(n) + 4 * EPS) for n in (h, w))


@pytest.mark.parametrize("size", [(300, 451), (20, 30), (37, 53), (111, 53), (6000, 7)])
def test_resize_rows_equals_interpolate(size):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 37, 53, generator=g)
    ref = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    out = torch.cat([resize_rows(x, size, a, b) for a, b in row_bands(size[0], size[1], max_pixels=2000, min_rows=7)],
                    dim=1)
    torch.testing.assert_close(out, ref, rtol=0, atol=bilinear_tolerance(x, size))


def test_resize_rows_is_exact_on_integer_grids():
    # upsampling by 2 puts every weight at 1/4 or 3/4 (exact in binary): no coordinate rounding can move it
    x = torch.arange(12, dtype=torch.float32).view(1, 3, 4) * 4
    ref = F.interpolate(x[None], size=(6, 8), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(torch.cat([resize_rows(x, (6, 8), a, a + 2) for a in (0, 2, 4)], dim=1), ref,
                               rtol=0, atol=0)


def test_row_bands_cover_exactly():
    bands = list(row_bands(1000, 300, max_pixels=30000, min_rows=8))
    assert bands[0] == (0, 100) and bands[-1][1] == 1000
    assert all(a == b for (_, a), (b, _) in zip(bands, bands[1:]))


def pamr_tolerance(mask: torch.Tensor, steps: int) -> float:
    """Bound on |band PAMR - full PAMR| for the *same* full-resolution inputs.

    Every per-pixel operation is identical except where a vectorised and a scalar ``exp`` (inside the softmax
    over the 16 affinities) differ, by a few ulps: the affinities a_k (summing to 1) then differ by at most
    ~4·eps relative, so one step's convex combination of mask values bounded by m changes by <= 4·eps·m, plus
    16 rounded multiply-adds (<= 16·eps·m). Errors already present are not amplified (a convex combination).
    """
    m = float(mask.abs().max())
    return steps * (4 + 16) * EPS * m


def test_pamr_bands_with_halo_equal_full_image():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 60, 80, generator=g)
    lg = torch.randn(4, 30, 40, generator=g)
    size, steps, dil = (240, 170), 3, (2, 4)
    # the reference gets the very same resized inputs (resize_rows over all rows; its agreement with
    # F.interpolate is the test above), so only the band/halo logic is under test here
    img_full = resize_rows(img, size, 0, size[0])[None]
    lg_full = resize_rows(lg, size, 0, size[0])[None]
    full = pamr(img_full, lg_full, steps=steps, dilations=dil)[0]
    bands = [pamr_rows(img, lg, size, a, b, steps=steps, dilations=dil)
             for a, b in row_bands(240, 170, max_pixels=170 * 20, min_rows=5)]
    torch.testing.assert_close(torch.cat(bands, dim=1), full, rtol=0, atol=pamr_tolerance(lg_full, steps))
    # without the halo the band edges are wrong: the halo is what makes it exact
    cut = [pamr_rows(img, lg, size, a, b, steps=steps, dilations=dil, halo=0)
           for a, b in row_bands(240, 170, max_pixels=170 * 20, min_rows=5)]
    assert (torch.cat(cut, dim=1) - full).abs().max() > 100 * pamr_tolerance(lg_full, steps)


@pytest.mark.parametrize("size", [(18, 26), (12, 53), (37, 20), (90, 140)])
def test_resize_rows_from_fetches_only_the_rows_it_needs(size):
    # a map given band by band (as Trident's refinement computes its full-resolution probabilities): each band of
    # the resize asks only for the source rows it interpolates from, and equals the whole-map resize
    x = torch.randn(4, 37, 53, generator=torch.Generator().manual_seed(1))
    asked = []

    def fetch(r0, r1):
        asked.append((r0, r1))
        return x[:, r0:r1]

    ref = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    bands = list(row_bands(size[0], size[1], max_pixels=5 * size[1], min_rows=5))
    out = torch.cat([resize_rows_from(fetch, (37, 53), size, a, b) for a, b in bands], dim=1)
    torch.testing.assert_close(out, ref, rtol=0, atol=bilinear_tolerance(x, size))
    rows_per_band = max(b - a for a, b in bands)
    assert max(r1 - r0 for r0, r1 in asked) <= 2 + rows_per_band * 37 / size[0] + 1
    with pytest.raises(ValueError, match="fetch"):
        resize_rows_from(lambda a, b: x[:, :1], (37, 53), size, 0, 3)
