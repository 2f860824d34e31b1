"""ovseg.weights: the meaning of a weights argument, the strict load, and downloads that use the cache first and
stop at the first failed connection (no network needed: the hub is simulated with monkeypatch)."""
import os

import pytest
import torch

from ovseg.errors import InvalidInputError, InvalidTypeError, PathNotFoundError
from ovseg.weights import (
    WeightsSource,
    download_errors,
    downloading,
    fetch_hub_file,
    fetch_url,
    parse_weights,
    strict_load,
)


def test_parse_weights_dispatch(tmp_path):
    f = tmp_path / "w.pth"
    f.write_bytes(b"")
    tags = ("openai", "laion2b_s34b_b88k")
    assert parse_weights(None, option="o") == WeightsSource("default")
    assert parse_weights("random", option="o", tags=tags) == WeightsSource("random")
    assert parse_weights("openai", option="o", tags=tags) == WeightsSource("tag", tag="openai")
    assert parse_weights(str(f), option="o", tags=tags) == WeightsSource("path", path=f)
    assert parse_weights(f, option="o").path == f  # os.PathLike
    assert parse_weights(str(tmp_path), option="o").path == tmp_path  # folders are paths too
    with pytest.raises(InvalidInputError, match="did you mean 'openai'.*laion2b_s34b_b88k"):
        parse_weights("opnai", option="clip_weights", tags=tags)
    with pytest.raises(PathNotFoundError, match="vfm_weights.*missing.pth"):
        parse_weights(str(tmp_path / "missing.pth"), option="vfm_weights")
    with pytest.raises(InvalidInputError, match="'dino' is not an existing file or folder, or 'random'"):
        parse_weights("dino", option="vfm_weights")
    with pytest.raises(InvalidTypeError, match="got int 3"):
        parse_weights(3, option="vfm_weights")


def test_strict_load_counts_examples_and_leaves_the_model_untouched():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {"0.weight": torch.ones(4, 3), "0.bias": torch.ones(5), "2.weight": torch.ones(1), "extra": torch.ones(1)}
    with pytest.raises(InvalidInputError) as e:
        strict_load(model, sd, option="vfm_weights", value="x.pth", target="VFM 'v'", expected="the official x.pth")
    msg = str(e.value)
    for needle in ("vfm_weights 'x.pth' does not fit VFM 'v'", "2 missing keys", "'1.weight'", "2 unexpected keys",
                   "'extra'", "1 shape mismatches", "0.bias: (5,) in the file, (4,) in the model",
                   "expected the official x.pth"):
        assert needle in msg, needle
    for k, v in model.state_dict().items():  # nothing was copied in (no partial load)
        assert torch.equal(v, before[k]), k
    good = {k: torch.full_like(v, 0.5) for k, v in before.items()}
    strict_load(model, good, option="o", value="v", target="t", expected="e")
    assert all(torch.equal(v, good[k]) for k, v in model.state_dict().items())


def test_download_errors_are_only_io_and_transport_failures():
    from huggingface_hub.errors import LocalEntryNotFoundError

    errors = download_errors()
    for exc in (OSError(), ConnectionError(), LocalEntryNotFoundError("x"), TimeoutError()):
        assert isinstance(exc, errors), type(exc)
    for exc in (TypeError(), ValueError(), KeyError(), RuntimeError(), AttributeError()):
        assert not isinstance(exc, errors), type(exc)
    import sys

    import huggingface_hub.file_download  # noqa: F401  (imports the HTTP client it uses)

    clients = [sys.modules[n] for n in ("httpx", "httpx2", "requests") if n in sys.modules]
    assert clients
    for mod in clients:  # connection errors of huggingface_hub's HTTP client (httpx's are not OSErrors)
        assert isinstance(mod.ConnectionError("x") if mod.__name__ == "requests" else mod.ConnectError("x"),
                          download_errors()), mod.__name__


def test_downloading_chains_only_download_failures():
    from ovseg.errors import WeightsUnavailableError

    cause = ConnectionError("boom")
    with pytest.raises(WeightsUnavailableError) as e:
        with downloading("M", fetch="f.pth from https://x", load="Segmenter(..., w=PATH)"):
            raise cause
    assert e.value.__cause__ is cause
    assert "f.pth from https://x" in str(e.value) and "Segmenter(..., w=PATH)" in str(e.value)
    with pytest.raises(TypeError, match="typo"):  # not a download failure: untouched
        with downloading("M", fetch="f", load="l"):
            raise TypeError("typo")


def _fake_cache(root, repo, filename, payload=b"weights"):
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / filename).write_bytes(payload)
    return snap / filename


@pytest.fixture
def hub(monkeypatch):
    """HF_HUB_OFFLINE unset; every HEAD request fails like a missing DNS, and is counted."""
    import huggingface_hub
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False, raising=False)
    calls = []

    def head(url, *a, **k):
        calls.append(url)
        raise ConnectionError("simulated: Name or service not known")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", head)
    return calls


def test_fetch_hub_file_uses_the_cache_without_network(tmp_path, hub):
    """The second candidate name is cached: it is returned, and no request is made."""
    cached = _fake_cache(tmp_path, "org/model", "open_clip_pytorch_model.bin")
    got = fetch_hub_file("org/model", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"],
                         cache_dir=str(tmp_path))
    assert os.path.samefile(got, cached) and hub == []


def test_fetch_hub_file_stops_at_the_first_failed_connection(tmp_path, hub):
    with pytest.raises(ConnectionError):
        fetch_hub_file("org/model", ["a.safetensors", "a.bin"], cache_dir=str(tmp_path / "empty"))
    assert len(hub) == 1 and hub[0].endswith("a.safetensors")


def test_offline_mode_never_connects(tmp_path, hub, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        fetch_hub_file("org/model", ["a.bin"], cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1"):
        fetch_url("https://example.invalid/files/w.pth", cache_dir=str(tmp_path))
    assert hub == []
    (tmp_path / "w.pth").write_bytes(b"x")  # an already fetched URL file is used as is
    assert fetch_url("https://example.invalid/files/w.pth", cache_dir=str(tmp_path)) == str(tmp_path / "w.pth")
