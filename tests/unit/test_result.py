"""Result pictures: sizes, label colours, legend content, palette PNG round trip."""
import numpy as np
import pytest
from PIL import Image

from ovseg.result import SegmentationResult, palette


@pytest.fixture
def result():
    lm = np.zeros((120, 200), np.int32)
    lm[:, 80:] = 1
    lm[90:, :] = 3  # label 2 absent
    img = np.full((120, 200, 3), 100, np.uint8)
    probs = np.zeros((4, 120, 200), np.float32)
    return SegmentationResult(lm, ["sky", "sofa", "cat", "floor"], probs=probs, image=img)


def _colors(img):
    return {tuple(c) for c in np.asarray(img.convert("RGB")).reshape(-1, 3)}


def test_palette_is_distinct_and_deterministic():
    p = palette(60)
    assert p.shape == (60, 3) and p.dtype == np.uint8
    assert len({tuple(c) for c in p}) == 60
    np.testing.assert_array_equal(p, palette(60))


def test_overlay_size_and_label_colours(result):
    pal = palette(4)
    full = result.overlay(alpha=1.0)
    assert full.size == (200, 120)
    assert _colors(full) == {tuple(pal[0]), tuple(pal[1]), tuple(pal[3])}  # present labels only
    half = np.asarray(result.overlay(alpha=0.5)).astype(int)
    np.testing.assert_allclose(half[0, 0], (100 + pal[0].astype(int)) / 2, atol=1)
    with pytest.raises(ValueError, match="1.5"):
        result.overlay(alpha=1.5)


def test_overlay_with_legend_keeps_size_and_draws_swatches(result):
    ov = result.overlay(alpha=0.0, legend=True)  # alpha 0: the photo is grey, so any colour comes from the legend
    assert ov.size == (200, 120)
    cols = _colors(ov)
    pal = palette(4)
    assert tuple(pal[0]) in cols and tuple(pal[1]) in cols and tuple(pal[3]) in cols
    assert tuple(pal[2]) not in cols  # 'cat' is absent, so it is not in the legend


def test_legend_lists_present_labels_by_share(result):
    entries = result.legend_entries()
    assert [e[0] for e in entries] == ["sofa", "sky", "floor"]
    assert sum(e[2] for e in entries) == pytest.approx(1.0)
    leg = result.legend()
    assert leg.height > 3 * 10 and tuple(palette(4)[1]) in _colors(leg)


def test_label_png_round_trip_and_mask(result, tmp_path):
    paths = result.save(tmp_path, "x", save_probs=True)
    lab = Image.open(paths["labels"])
    assert lab.mode == "P" and lab.size == (200, 120)
    np.testing.assert_array_equal(np.asarray(lab), result.label_map)
    assert np.load(paths["probs"]).shape == (4, 120, 200)
    assert Image.open(paths["overlay"]).size == (200, 120)
    assert result.mask("sofa").sum() == (200 - 80) * 90
    np.testing.assert_array_equal(result.mask("floor"), result.label_map == 3)
    with pytest.raises(ValueError, match="'dog'"):
        result.mask("dog")


def test_many_labels_use_16_bit_png(tmp_path):
    lm = np.arange(300 * 4, dtype=np.int32).reshape(40, 30) % 300
    r = SegmentationResult(lm, [f"c{i}" for i in range(300)], probs=np.zeros((300, 40, 30), np.float32))
    p = r.save(tmp_path, "many")["labels"]
    np.testing.assert_array_equal(np.asarray(Image.open(p)).astype(np.int32), lm)


def test_jupyter_png(result):
    assert result._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"


def _unicode_result():
    lm = np.zeros((90, 240), np.int32)
    lm[:, 120:] = 1
    return SegmentationResult(lm, ["床", "café"], image=np.full((90, 240, 3), 200, np.uint8))


def test_unicode_labels_are_drawn_with_real_glyphs(tmp_path):
    import ovseg.result as R

    R._choose_font.cache_clear()
    text = "床 café 50.0%"
    assert R._missing_chars(R._default_font(24), "床é") == "床é"  # Pillow's own font draws boxes for both
    path = R.find_font(text)
    if path is None or R._missing_chars(R._truetype(path, 24), text):
        pytest.skip('no font with CJK glyphs here (pip install "ovseg[fonts]")')
    assert R._missing_chars(R._truetype(path, 24), "床é") == ""  # their bitmaps differ from the .notdef box
    res = _unicode_result()
    drawn = np.asarray(res.legend(font_size=24))
    res.legend(font_size=24).save(tmp_path / "legend.png")
    R._choose_font.cache_clear()
    with pytest.MonkeyPatch.context() as mp:  # the same legend in Pillow's font: boxes instead of glyphs
        mp.setattr(R, "find_font", lambda t: None)
        boxes = np.asarray(res.legend(font_size=24))
    assert drawn.shape != boxes.shape or not np.array_equal(drawn, boxes)
    assert res.overlay(legend=True).size == (240, 90)


def test_without_a_covering_font_a_warning_names_the_fix(monkeypatch, caplog):
    import ovseg.result as R

    R._choose_font.cache_clear()
    monkeypatch.delenv(R.FONT_ENV, raising=False)
    monkeypatch.setattr(R, "_packaged_font", lambda: None)
    monkeypatch.setattr(R, "_fontconfig_fonts", lambda chars: ())
    with caplog.at_level("WARNING", logger="ovseg.result"):
        assert R.find_font("床") is None
    assert "ovseg[fonts]" in caplog.text and R.FONT_ENV in caplog.text
    R._choose_font.cache_clear()
    assert R.find_font("plain ascii 12.5%") is None and "ascii" not in caplog.text  # Pillow's font suffices


def test_ovseg_font_environment_variable_wins(monkeypatch):
    import ovseg.result as R

    path = R._packaged_font() or next(iter(R._fontconfig_fonts("é")), None)
    if path is None:
        pytest.skip("no TrueType font file on this machine")
    R._choose_font.cache_clear()
    monkeypatch.setenv(R.FONT_ENV, path)
    assert R.find_font("café") == path
    R._choose_font.cache_clear()
