"""Registries (did-you-mean, duplicates), optional-dependency errors, and a light `import ovseg`."""
import subprocess
import sys

import pytest

import ovseg
from ovseg._deps import require
from ovseg._registry import Registry
from ovseg.methods import get_method


def test_list_methods_and_vfms():
    methods = ovseg.list_methods()
    assert methods == sorted(methods)
    # the seed presets, plus those of the methods integrated since (each branch adds its own line)
    assert {"clearclip", "clip", "maskclip", "naclip", "proxyclip", "sclip"} <= set(methods)
    assert {"trident", "trident_l14", "trident_h14"} <= set(methods)
    assert {"dino_s16", "dino_s8", "dino_b16", "dino_b8"} <= set(ovseg.list_vfms())


def test_did_you_mean_and_duplicates():
    reg = Registry("widget", "list_widgets")
    reg.register("proxyclip", object())
    with pytest.raises(ValueError, match="did you mean 'proxyclip'"):
        reg.get("proxclip")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("proxyclip", object())
    with pytest.raises(ValueError, match="unknown method 'nacl1p'; did you mean 'naclip'"):
        get_method("nacl1p")


def test_missing_optional_dependency_names_the_extra():
    with pytest.raises(ImportError, match=r'pip install "ovseg\[sd\]"'):
        require("surely_not_a_module_ovseg", "sd", what="vfm 'sd15'")


def test_import_is_light():
    code = ("import sys, ovseg, ovseg.demo, ovseg.cli; heavy = [m for m in ('diffusers', 'transformers', 'timm', "
            "'open_clip', 'gradio') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_preset_values_match_the_papers():
    p = get_method("proxyclip")
    assert (p.attention, p.vfm, p.window, p.stride, p.pad_multiple, p.beta, p.gamma, p.logit_scale) == \
        ("proxy", "dino_b8", (336, 336), (112, 112), 56, 1.2, 3.0, 40.0)
    assert (p.residual, p.ffn) == (False, False)
    n = get_method("naclip")
    assert (n.attention, n.window, n.stride, n.pamr_steps, n.pamr_dilations, n.sigma, n.residual, n.ffn) == \
        ("gaussian_kk", (224, 224), (112, 112), 10, (8, 16), 5.0, False, False)
    s = get_method("sclip")
    assert (s.attention, s.residual, s.ffn) == ("qq_kk", True, True)
    assert (get_method("clearclip").attention, get_method("clearclip").residual) == ("qq", False)
    assert (get_method("maskclip").attention, get_method("maskclip").residual, get_method("maskclip").ffn) == \
        ("maskclip", True, True)


def test_preset_overrides_are_validated():
    p = get_method("naclip")
    assert p.replace(window=0).window is None
    assert p.replace(window=(224, 320), stride=100).stride == (100, 100)
    with pytest.raises(ValueError, match="stride .* larger than window"):
        p.replace(window=224, stride=300)
    with pytest.raises(ValueError, match="positive"):
        p.replace(stride=-1)
    with pytest.raises(TypeError, match="did you mean 'sigma'"):
        p.replace(sigmaa=3)
    with pytest.raises(ValueError, match="does not use a VFM"):
        p.replace(vfm="dino_b8")
