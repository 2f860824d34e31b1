"""``ovseg demo``: the prediction function, the named API endpoint (gradio_client) and the page in a real headless
Chromium (Playwright), all on tiny seeded random-weight models of the real architectures."""
from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg.demo import SegmenterCache, render_overlay, run_prediction, split_labels
from ovseg.errors import InvalidInputError
from ovseg.text import parse_labels

from .conftest import make_segmenter

LABELS = "red, green; grass, blue"  # with these the tiny random model puts all three classes in IMAGE
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _image() -> np.ndarray:
    """(120, 176, 3) uint8: colour ramps with a red rectangle."""
    h, w = 120, 176
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, ((xx + yy) % 97) * 2.6], axis=-1)
    img[30:90, 40:110] = [250, 30, 30]
    return img.astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _tiny_factory(method, vfm, vfm_weights):
    """Tiny seeded models, built once per (method, VFM) for the whole module (the served app shares them);
    short_side=0 keeps the 120x176 input size: one window per image, fast on 2 cores."""
    return make_segmenter(method, vfm=vfm, vfm_weights=vfm_weights, short_side=0)


@pytest.fixture(scope="module")
def cache():
    return SegmenterCache(_tiny_factory, vfm_weights="random")


def _check_overlay(overlay: np.ndarray, image: np.ndarray, label_png: str) -> np.ndarray:
    """The overlay is the label PNG's palette colour blended half-and-half over the input, pixel for pixel
    (exact: 0.5·a + 0.5·b + 0.5 is exact in float32 for 8-bit a, b). Returns the label map read from the PNG."""
    png = Image.open(label_png)
    assert png.mode == "P"
    label_map = np.asarray(png)
    colours = np.asarray(png.getpalette()[: 3 * 256], dtype=np.float64).reshape(-1, 3)
    expected = np.floor(0.5 * image.astype(np.float64) + 0.5 * colours[label_map] + 0.5)
    assert overlay.shape == image.shape
    np.testing.assert_array_equal(overlay, expected.astype(np.uint8))
    return label_map


# ---------------------------------------------------------------------------------------------- no Gradio needed
def test_split_labels_uses_ovseg_validation():
    assert split_labels(" cat, sofa; couch ,floor") == ["cat", "sofa; couch", "floor"]
    for empty in (None, "", "  \n"):
        with pytest.raises(InvalidInputError, match="no labels given"):
            split_labels(empty)
    with pytest.raises(ValueError) as ours:
        split_labels("cat, Cat")
    with pytest.raises(ValueError) as theirs:
        parse_labels(["cat", "Cat"])
    assert str(ours.value) == str(theirs.value) and "duplicate label" in str(ours.value)
    with pytest.raises(ValueError, match="empty or whitespace-only label"):
        split_labels("cat,, dog")


def test_cache_resolves_vfms_and_keeps_the_most_recent():
    built = []

    def factory(method, vfm, vfm_weights):
        built.append((method, vfm, vfm_weights))
        return object()

    c = SegmenterCache(factory, vfm_weights="dino.pth", weights_vfm="dino_b8", size=2)
    assert c.resolve("naclip", "dino_b8") == ("naclip", None, None)  # a method without a VFM ignores it
    assert c.resolve("proxyclip", None) == ("proxyclip", "dino_b8", "dino.pth")  # the preset's VFM
    assert c.resolve("proxyclip", "dinov2_b14") == ("proxyclip", "dinov2_b14", None)  # the file is dino_b8's only
    a = c.get("proxyclip")
    assert c.get("proxyclip", "dino_b8") is a and built == [("proxyclip", "dino_b8", "dino.pth")]
    c.get("naclip", "ignored")
    c.get("proxyclip")  # most recent again: sclip then evicts naclip
    c.get("sclip")
    assert ("naclip", None) not in c and ("proxyclip", "dino_b8") in c and len(c) == 2
    assert c.get("proxyclip") is a and len(built) == 3
    with pytest.raises(ValueError, match="did you mean 'proxyclip'"):
        c.get("proxyclp")
    with pytest.raises(InvalidInputError, match="--vfm NAME"):
        SegmenterCache(factory, vfm_weights="dino.pth")
    with pytest.raises(InvalidInputError, match="either a factory or Segmenter keyword"):
        SegmenterCache(factory, clip="ViT-B-16")


def test_render_overlay_colours_only_the_shown_classes():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    overlay = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    label_map = rng.integers(0, 3, (5, 7))
    labels = ["a", "b", "c"]
    out = render_overlay(image, overlay, label_map, labels, ["a", "c"])
    shown = np.isin(label_map, [0, 2])
    np.testing.assert_array_equal(out[shown], overlay[shown])
    np.testing.assert_array_equal(out[~shown], image[~shown])
    np.testing.assert_array_equal(render_overlay(image, overlay, label_map, labels, []), image)
    assert render_overlay(image, overlay, label_map, labels, None) is overlay
    with pytest.raises(InvalidInputError, match="unknown classes"):
        render_overlay(image, overlay, label_map, labels, ["d"])


class _Progress:
    """Records ``progress(fraction, desc=...)`` calls; falsy like ``gr.Progress`` (which has a length)."""

    def __init__(self):
        self.calls = []

    def __len__(self):
        return 0

    def __call__(self, fraction, desc=None, **kw):
        self.calls.append((fraction, desc))


def test_run_prediction_outputs(cache, tmp_path):
    img = _image()
    progress = _Progress()
    out = run_prediction(cache, img, LABELS, "proxyclip", "dino_b8", 0.0, out_dir=str(tmp_path), progress=progress)
    assert progress.calls == [(0.0, "loading proxyclip + dino_b8"), (0.1, "segmenting"), (0.9, "rendering")]
    seg = cache.get("proxyclip", "dino_b8")
    direct = seg.predict(img, ["red", "green; grass", "blue"], threshold=0.0)
    label_map = _check_overlay(out.overlay, img, out.label_png)
    np.testing.assert_array_equal(label_map, direct.label_map)
    np.testing.assert_array_equal(out.label_map, direct.label_map)
    assert len(np.unique(label_map)) == 3  # every class present: the toggle tests below are not vacuous
    res = json.loads(Path(out.results_json).read_text(encoding="utf-8"))
    assert res == out.results
    assert res["labels"] == ["red", "green", "blue"]
    assert res["synonyms"] == {"red": ["red"], "green": ["green", "grass"], "blue": ["blue"]}
    counts = np.bincount(label_map.ravel(), minlength=3) / label_map.size
    assert res["fractions"] == {k: round(float(v), 6) for k, v in zip(res["labels"], counts)}
    assert res["image"] == {"height": 120, "width": 176}
    s = res["settings"]
    assert (s["method"], s["vfm"], s["vfm_weights"], s["clip_weights"], s["threshold"]) == \
        ("proxyclip", "dino_b8", "random", "random", 0.0)
    with pytest.raises(InvalidInputError, match="threshold must be a number in"):
        run_prediction(cache, img, LABELS, "proxyclip", None, 1.5, out_dir=str(tmp_path))


@pytest.mark.parametrize("image, labels, method, message", [
    (None, "cat, dog", "proxyclip", "no image given"),
    (_image(), "", "proxyclip", "no labels given"),
    (_image(), "cat, dog, cat", "proxyclip", "duplicate label 'cat'"),
    (_image(), "cat, , dog", "proxyclip", "empty or whitespace-only label"),
    (_image(), "cat, dog", "naclp", "did you mean 'naclip'"),
    (_image()[:8, :8], "cat, dog", "proxyclip", "too small"),
])
def test_run_prediction_bad_input(cache, tmp_path, image, labels, method, message):
    with pytest.raises(ValueError, match=message):
        run_prediction(cache, image, labels, method, None, 0.0, out_dir=str(tmp_path))


def test_cli_demo_parses_options_and_builds_with_them(monkeypatch):
    from ovseg import cli, demo

    seen = {}
    monkeypatch.setattr(demo, "launch_demo", lambda **kw: seen.update(kw) or 0)
    monkeypatch.setattr(cli, "_segmenter", lambda args: args)  # what the demo's factory would build with
    assert cli.main(["demo", "--method", "naclip", "--clip-weights", "random", "--port", "7999",
                     "--window", "0"]) == 0
    assert (seen["host"], seen["port"], seen["share"], seen["method"], seen["vfm"], seen["clip_weights"]) == \
        ("127.0.0.1", 7999, False, "naclip", None, "random")
    built = seen["factory"]("proxyclip", "dino_s16", "random")
    assert (built.method, built.vfm, built.vfm_weights, built.clip_weights, built.window) == \
        ("proxyclip", "dino_s16", "random", "random", 0)


def test_cli_demo_errors(capsys, monkeypatch):
    from ovseg import _deps, cli

    assert cli.main(["demo", "--method", "proxyclp"]) == 2
    assert "did you mean 'proxyclip'" in capsys.readouterr().err
    assert cli.main(["demo", "--method", "naclip", "--vfm", "dino_b8"]) == 2
    assert "uses no VFM" in capsys.readouterr().err
    assert cli.main(["demo", "--method", "naclip", "--vfm-weights", "dino.pth"]) == 2
    assert "--vfm NAME" in capsys.readouterr().err
    real = _deps.is_available
    monkeypatch.setattr(_deps, "is_available", lambda m: False if m == "gradio" else real(m))
    assert cli.main(["demo", "--clip-weights", "random"]) == 2
    assert 'pip install "ovseg[demo]"' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- a served app
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    """The demo on a free localhost port, sharing the module's tiny-model cache."""
    pytest.importorskip("gradio")
    from ovseg.demo import build_demo

    app = build_demo(method="proxyclip", clip_weights="random", vfm_weights="random", factory=_tiny_factory)
    app.queue()
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield app, f"http://127.0.0.1:{port}/"
    app.close()
    app.ovseg_files.cleanup()


def test_api_endpoint_with_gradio_client(served, tmp_path):
    client_mod = pytest.importorskip("gradio_client")
    app, url = served
    img = _image()
    path = tmp_path / "input.png"
    Image.fromarray(img).save(path)
    client = client_mod.Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
    api = client.view_api(return_format="dict", print_info=False)
    assert list(api["named_endpoints"]) == ["/predict"]  # the UI-only events stay private
    params = api["named_endpoints"]["/predict"]["parameters"]
    assert [p["parameter_name"] for p in params] == ["image", "labels", "method", "vfm", "threshold"]
    overlay_path, label_png, results_json = client.predict(  # the call docs/demo.md shows
        image=client_mod.handle_file(str(path)), labels=LABELS, method="proxyclip", vfm="dino_b8", threshold=0.0,
        api_name="/predict")
    overlay = np.asarray(Image.open(overlay_path).convert("RGB"))
    label_map = _check_overlay(overlay, img, label_png)
    expected = _tiny_factory("proxyclip", "dino_b8", "random").predict(img, ["red", "green; grass", "blue"])
    np.testing.assert_array_equal(label_map, expected.label_map)
    res = json.loads(Path(results_json).read_text(encoding="utf-8"))
    assert res["labels"] == ["red", "green", "blue"] and res["settings"]["method"] == "proxyclip"
    # bad input reaches the client as ovseg's own message
    with pytest.raises(client_mod.exceptions.AppError, match="duplicate label 'red'"):
        client.predict(client_mod.handle_file(str(path)), "red, blue, red", "proxyclip", "dino_b8", 0.0,
                       api_name="/predict")
    with pytest.raises(client_mod.exceptions.AppError, match="did you mean 'naclip'"):
        client.predict(client_mod.handle_file(str(path)), LABELS, "naclp", "dino_b8", 0.0, api_name="/predict")


@pytest.fixture(scope="module")
def chromium():
    """(playwright.sync_api, path of Debian's Chromium); checked before the app is served, so a skip is cheap."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the Python package 'playwright' is not installed")
    path = os.environ.get("OVSEG_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.skip(f"no Chromium at {path} (Debian: apt-get install chromium; .ci/run installs it when it can), "
                    "so the browser test cannot run")
    return sync_api, path


def test_browser_upload_label_toggle(chromium, served, tmp_path):
    """A real headless Chromium: upload, type labels, Run, read the overlay image the page shows, untick a
    class, switch methods. Screenshots are left in tmp_path (demo.png, demo_toggled.png)."""
    sync_api, chromium_path = chromium
    app, url = served
    img = _image()
    path = tmp_path / "input.png"
    Image.fromarray(img).save(path)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(url)
            page.set_input_files("#ovseg-image input[type=file]", str(path))
            page.wait_for_selector("#ovseg-image img")  # the upload is shown
            page.click("#ovseg-run")  # no labels yet: ovseg's message appears
            page.get_by_text("no labels given").first.wait_for()
            page.fill("#ovseg-labels textarea", LABELS)
            page.click("#ovseg-run")
            page.wait_for_selector("#ovseg-classes input[type=checkbox]")  # after the run, the toggles appear
            src = page.get_attribute("#ovseg-overlay img", "src")
            overlay = _fetch_image(page, src)
            label_png = tmp_path / "labels.png"
            label_png.write_bytes(page.request.get(page.get_attribute("#ovseg-label-png a", "href")).body())
            label_map = _check_overlay(overlay, img, str(label_png))
            expected = _tiny_factory("proxyclip", "dino_b8", "random").predict(img, ["red", "green; grass", "blue"])
            np.testing.assert_array_equal(label_map, expected.label_map)
            assert page.locator("#ovseg-classes input[type=checkbox]").count() == 3
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            # untick "green": its pixels show the photo, the others keep their colour, no re-run
            page.get_by_label("green", exact=True).uncheck()
            deadline = time.monotonic() + 30
            while page.get_attribute("#ovseg-overlay img", "src") == src:
                assert time.monotonic() < deadline, "the overlay did not change after unticking a class"
                page.wait_for_timeout(100)
            toggled = _fetch_image(page, page.get_attribute("#ovseg-overlay img", "src"))
            green = label_map == 1
            np.testing.assert_array_equal(toggled[green], img[green])
            np.testing.assert_array_equal(toggled[~green], overlay[~green])
            page.screenshot(path=str(tmp_path / "demo_toggled.png"), full_page=True)
            # a method without a VFM disables (and empties) the VFM box; back to proxyclip restores its preset
            vfm_box = page.locator("#ovseg-vfm input")
            assert vfm_box.is_enabled() and vfm_box.input_value() == "dino_b8"
            for name, enabled, value in (("naclip", False, ""), ("proxyclip", True, "dino_b8")):
                page.locator("#ovseg-method input").fill(name)
                page.locator("#ovseg-method input").press("Enter")
                page.wait_for_function("([sel, on]) => !document.querySelector(sel).disabled === on",
                                       arg=["#ovseg-vfm input", enabled])
                assert vfm_box.input_value() == value
        finally:
            browser.close()


def _fetch_image(page, src: str) -> np.ndarray:
    import io

    assert src and not src.startswith("data:"), src
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))
