"""precision="auto" and the warning for emulated reduced precision on CPUs."""
import logging

import pytest
import torch

from ovseg import precision as P
from ovseg.errors import InvalidInputError


@pytest.fixture
def fake_cpu(monkeypatch):
    monkeypatch.delenv("OVSEG_PRECISION", raising=False)

    def set_features(bf16: bool, fp16: bool = False):
        monkeypatch.setattr(P, "cpu_features",
                            lambda: {"bf16": bf16, "fp16": fp16, "amx": bf16, "avx512_bf16": False})
        monkeypatch.setattr(P, "_WARNED", set())
    return set_features


def test_auto_per_device(fake_cpu):
    fake_cpu(bf16=False)
    assert P.resolve_precision("auto", "cpu") == "fp32"
    assert P.resolve_precision(None, torch.device("cpu")) == "fp32"
    assert P.resolve_precision("auto", "cuda:1") == "fp16"  # as the papers ran
    assert P.resolve_precision("auto", "mps") == "fp32"
    fake_cpu(bf16=True)
    assert P.resolve_precision("auto", "cpu") == "bf16"
    assert P.resolve_precision("fp32", "cpu") == "fp32"


def test_explicit_emulated_precision_warns_once(fake_cpu, caplog):
    fake_cpu(bf16=False)
    with caplog.at_level(logging.WARNING, logger="ovseg.precision"):
        assert P.resolve_precision("bf16", "cpu") == "bf16"  # honoured
        assert P.resolve_precision("bf16", "cpu") == "bf16"
        assert P.resolve_precision("fp16", "cpu") == "fp16"
        assert P.resolve_precision("fp16", "cuda") == "fp16"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "emulates" in warnings[0] and "'bf16'" in warnings[0] and "'fp16'" in warnings[1]
    fake_cpu(bf16=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ovseg.precision"):
        P.resolve_precision("bf16", "cpu")
    assert not caplog.records


def test_bad_precision_names_the_value():
    with pytest.raises(InvalidInputError, match="auto.*'half'"):
        P.resolve_precision("half", "cpu")


def test_real_cpu_features_and_line(monkeypatch):
    monkeypatch.delenv("OVSEG_PRECISION", raising=False)
    feats = P.cpu_features()
    assert set(feats) >= {"bf16", "fp16", "amx"} and all(isinstance(v, bool) for v in feats.values())
    line = P.cpu_capability_line()
    assert torch.backends.cpu.get_cpu_capability() in line and "native bf16" in line
    assert P.resolve_precision("auto", "cpu") == ("bf16" if feats["bf16"] else "fp32")


def test_ovseg_precision_pins_auto_only(fake_cpu, monkeypatch):
    fake_cpu(bf16=True)
    monkeypatch.setenv("OVSEG_PRECISION", "fp32")
    assert P.resolve_precision("auto", "cpu") == "fp32"
    assert P.resolve_precision("auto", "cuda") == "fp32"
    assert P.resolve_precision("bf16", "cpu") == "bf16"  # an explicit choice wins
    monkeypatch.setenv("OVSEG_PRECISION", "half")
    with pytest.raises(InvalidInputError, match="OVSEG_PRECISION.*'half'"):
        P.resolve_precision("auto", "cpu")


def test_segmenter_auto_precision_follows_the_device(fake_cpu, monkeypatch):
    from ..conftest import make_segmenter

    fake_cpu(bf16=False)
    seg = make_segmenter("maskclip")
    assert seg.precision_request == "auto" and seg.precision == "fp32"
    fake_cpu(bf16=True)
    seg.to("cpu")  # "auto" is resolved again for the device moved to
    assert seg.precision == "bf16" and seg.settings()["precision"] == "bf16"
    seg = make_segmenter("maskclip", precision="fp32")
    seg.to("cpu")
    assert seg.precision == "fp32"
