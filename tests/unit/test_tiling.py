"""Band-wise full-resolution post-processing equals the whole-image computation."""
import pytest
import torch
import torch.nn.functional as F

from ovseg.pamr import pamr
from ovseg.tiling import pamr_rows, resize_rows, resize_rows_from, row_bands


@pytest.mark.parametrize("size", [(300, 451), (20, 30), (37, 53), (111, 53), (6000, 7)])
def test_resize_rows_equals_interpolate(size):
    x = torch.randn(5, 37, 53)
    ref = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    out = torch.cat([resize_rows(x, size, a, b) for a, b in row_bands(size[0], size[1], max_pixels=2000, min_rows=7)],
                    dim=1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=5e-6)


def test_row_bands_cover_exactly():
    bands = list(row_bands(1000, 300, max_pixels=30000, min_rows=8))
    assert bands[0] == (0, 100) and bands[-1][1] == 1000
    assert all(a == b for (_, a), (b, _) in zip(bands, bands[1:]))


def test_pamr_bands_with_halo_equal_full_image():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 60, 80, generator=g)
    lg = torch.randn(4, 30, 40, generator=g)
    size = (240, 170)
    full = pamr(F.interpolate(img[None], size=size, mode="bilinear", align_corners=False),
                F.interpolate(lg[None], size=size, mode="bilinear", align_corners=False), steps=3, dilations=(2, 4))[0]
    bands = [pamr_rows(img, lg, size, a, b, steps=3, dilations=(2, 4))
             for a, b in row_bands(240, 170, max_pixels=170 * 20, min_rows=5)]
    torch.testing.assert_close(torch.cat(bands, dim=1), full, rtol=1e-4, atol=1e-5)
    # without the halo the band edges are wrong: the halo is what makes it exact
    cut = [pamr_rows(img, lg, size, a, b, steps=3, dilations=(2, 4), halo=0)
           for a, b in row_bands(240, 170, max_pixels=170 * 20, min_rows=5)]
    assert not torch.allclose(torch.cat(cut, dim=1), full, atol=1e-3)


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
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=5e-6)
    rows_per_band = max(b - a for a, b in bands)
    assert max(r1 - r0 for r0, r1 in asked) <= 2 + rows_per_band * 37 / size[0] + 1
    with pytest.raises(ValueError, match="fetch"):
        resize_rows_from(lambda a, b: x[:, :1], (37, 53), size, 0, 3)
