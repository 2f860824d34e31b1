"""Every kind of input image is converted correctly; every bad input gets a clear ValueError/TypeError."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg.preprocess import load_image


def _roundtrip(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    buf.seek(0)
    return Image.open(buf)


def test_grayscale_palette_rgba_cmyk_16bit(tmp_path):
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 3)
    out = load_image(gray)
    assert out.shape == (8, 8, 3) and (out[..., 0] == np.asarray(gray)).all() and (out[..., 2] == out[..., 0]).all()

    pal = Image.new("P", (4, 4))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    out = load_image(pal)
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[1, 1]) == (0, 255, 0)

    rgba = Image.fromarray(np.array([[[200, 100, 50, 255], [200, 100, 50, 0]]], dtype=np.uint8), "RGBA")
    out = load_image(rgba)
    assert tuple(out[0, 0]) == (200, 100, 50) and tuple(out[0, 1]) == (255, 255, 255)  # transparent -> white

    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # pure red in CMYK
    assert tuple(load_image(cmyk)[1, 1]) == (255, 0, 0)

    a16 = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0 .. 65535
    p16 = tmp_path / "deep.png"
    Image.fromarray(a16).save(p16)
    out = load_image(str(p16))
    np.testing.assert_array_equal(out[..., 0], np.round(a16 / 65535 * 255).astype(np.uint8))


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :5] = 255  # white band on the left of a landscape image
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif, quality=100)
    out = load_image(str(p))
    assert out.shape == (20, 10, 3)  # portrait after orientation
    assert out[:5].mean() > 200 and out[-5:].mean() < 50  # the band is now at the top


def test_not_an_image_and_truncated(tmp_path):
    p = tmp_path / "x.jpg"
    p.write_bytes(b"hello")
    with pytest.raises(ValueError, match="x.jpg"):
        load_image(str(p))
    good = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, "PNG")
    t = tmp_path / "trunc.png"
    t.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.raises(ValueError, match="trunc.png"):
        load_image(str(t))


def test_missing_path_is_both_filenotfound_and_valueerror():
    with pytest.raises(ValueError, match="nope.png"):
        load_image("nope.png")
    with pytest.raises(FileNotFoundError):
        load_image("nope.png")


@pytest.mark.parametrize("bad,exc,needle", [
    (torch.full((3, 8, 8), float("nan")), ValueError, "NaN"),
    (torch.full((3, 8, 8), float("inf")), ValueError, "inf"),
    (torch.rand(8, 8), ValueError, "(8, 8)"),
    (torch.rand(4, 8, 8), ValueError, "(4, 8, 8)"),
    (torch.rand(3, 8, 8) * 255, ValueError, "[0, 1]"),
    (torch.zeros(3, 8, 8, dtype=torch.int32), TypeError, "int32"),
    (np.zeros((8, 8, 3), np.float64), TypeError, "float64"),
    (np.zeros((8, 8, 5), np.uint8), ValueError, "(8, 8, 5)"),
    (12, TypeError, "int"),
])
def test_bad_arrays_and_tensors(bad, exc, needle):
    with pytest.raises(exc) as e:
        load_image(bad)
    assert needle in str(e.value)
