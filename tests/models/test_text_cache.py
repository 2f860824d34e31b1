"""Persistent text-embedding cache: keys, verification, atomic concurrent writes, the size bound, and the text
classifier's memory -> disk -> text tower layering (tiny open_clip models with seeded random weights)."""
import logging
import multiprocessing
import os
import sys

import pytest
import torch

from ovseg.backbones import create_clip
from ovseg.cache import TextEmbeddingCache, clip_text_identity, file_sha256, ovseg_home
from ovseg.text import TextClassifier

from ..conftest import TINY_CLIP

TEMPLATES = ("a photo of a {}.", "a drawing of the {}.")


def _clip(seed=0, **kw):
    return create_clip("ViT-B-16", "random", seed=seed, model_kwargs=TINY_CLIP, **kw)


class _Counting:
    """Wraps a CLIP adapter and counts the prompts its text tower encodes."""

    def __init__(self, clip):
        self.clip, self.prompts = clip, 0
        self.model, self.tokenizer, self.arch, self.weights = clip.model, clip.tokenizer, clip.arch, clip.weights
        self.tokenize = clip.tokenize

    def parameters(self):
        return self.clip.parameters()

    def encode_text(self, tokens):
        self.prompts += len(tokens)
        return self.clip.encode_text(tokens)


def test_home_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("OVSEG_HOME", str(tmp_path / "h"))
    assert ovseg_home() == tmp_path / "h"
    monkeypatch.delenv("OVSEG_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ovseg_home() == tmp_path / "xdg" / "ovseg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert ovseg_home() == __import__("pathlib").Path.home() / ".cache" / "ovseg"


def test_second_process_reads_disk_and_adding_a_label_encodes_only_it(_ovseg_home):
    first = _Counting(_clip())
    a = TextClassifier(first)(["cat", "dog", "sky"], TEMPLATES)
    assert first.prompts == 6 and len(list((_ovseg_home / "text").glob("*.safetensors"))) == 3
    second = _Counting(_clip())  # a new model object with the same weights: as a fresh process
    tc = TextClassifier(second)
    b = tc(["cat", "dog", "sky"], TEMPLATES)
    assert second.prompts == 0 and tc.cache_info()["disk_hits"] == 3
    assert torch.equal(a, b)  # stored float32, read back bit-exact
    c = tc(["cat", "dog", "sky", "tree"], TEMPLATES)
    assert second.prompts == 2 and tc.cache_info()["encoded"] == 1  # one label x two templates
    assert torch.equal(c[:3], a)
    tc(["cat"], TEMPLATES[:1])  # other templates: another key
    assert second.prompts == 3
    assert torch.allclose(b.norm(dim=-1), torch.ones(3))


def test_other_weights_or_activation_never_reuse_entries(_ovseg_home):
    TextClassifier(_clip(seed=0))(["cat"], TEMPLATES)
    other = _Counting(_clip(seed=1))
    TextClassifier(other)(["cat"], TEMPLATES)
    assert other.prompts == 2  # other random weights: another key
    k0, k1 = clip_text_identity(_clip(seed=0)), clip_text_identity(_clip(seed=1))
    assert k0 == clip_text_identity(_clip(seed=0))
    assert (k0["seed"], k1["seed"]) == (0, 1) and k0["structure"] == k1["structure"]  # the adapter's identity
    # an adapter without an identity: random weights are keyed by their tensors
    f0, f1 = clip_text_identity(_Counting(_clip(seed=0))), clip_text_identity(_Counting(_clip(seed=1)))
    assert f0["tensors_sha256"] != f1["tensors_sha256"] and "seed" not in f0
    assert f0 == clip_text_identity(_Counting(_clip(seed=0)))
    gelu = create_clip("ViT-B-16", "random", seed=0, model_kwargs=TINY_CLIP)
    quick = create_clip("ViT-B-16-quickgelu", "random", seed=0, model_kwargs=TINY_CLIP)
    kg, kq = clip_text_identity(gelu), clip_text_identity(quick)
    assert kq["structure"] != kg["structure"] and kq["activation"] != kg["activation"]


class _Adapter:
    """A stand-in adapter with a given identity (as CLIPAdapter.identity reports it)."""

    def __init__(self, clip, identity):
        self.model, self.tokenizer, self.identity = clip.model, clip.tokenizer, identity


def test_identity_from_adapter_attribute_file_and_tag(tmp_path):
    clip = _clip()
    base = {"arch": "ViT-B-16", "source": "random", "tag": None, "path": None, "activation": "gelu",
            "seed": 3, "model_kwargs": {"embed_dim": 32}}
    key = clip_text_identity(_Adapter(clip, base))
    assert key["seed"] == 3 and key["model_kwargs"] == {"embed_dim": 32} and "tensors_sha256" not in key
    assert clip_text_identity(_Adapter(clip, dict(base, source="tag", tag="openai", seed=None)))["tag"] == "openai"
    assert clip_text_identity(_Adapter(clip, dict(base, source="custom"))) is None  # cannot be pinned down
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"weights")
    import hashlib

    by_file = clip_text_identity(_Adapter(clip, dict(base, source="file", path=str(ckpt), seed=None)),
                                 home=tmp_path / "home")
    assert by_file["sha256"] == hashlib.sha256(b"weights").hexdigest()


def test_file_hash_is_remembered_until_the_file_changes(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x" * 1000)
    import hashlib

    true = hashlib.sha256(f.read_bytes()).hexdigest()
    assert file_sha256(f, home=tmp_path / "home") == true
    (record,) = (tmp_path / "home" / "hashes").glob("*.json")
    import json

    saved = json.loads(record.read_text())
    record.write_text(json.dumps(dict(saved, sha256="remembered")))
    assert file_sha256(f, home=tmp_path / "home") == "remembered"  # not hashed again
    f.write_bytes(b"y" * 1000)  # same size, new contents and mtime
    os.utime(f, ns=(saved["mtime_ns"] + 10**9, saved["mtime_ns"] + 10**9))
    assert file_sha256(f, home=tmp_path / "home") == hashlib.sha256(b"y" * 1000).hexdigest()


def test_corrupt_or_mismatched_entries_are_ignored_and_rewritten(_ovseg_home):
    clip = _Counting(_clip())
    ref = TextClassifier(clip)(["cat", "dog"], TEMPLATES)
    files = sorted((_ovseg_home / "text").glob("*.safetensors"))
    assert len(files) == 2
    files[0].write_bytes(b"\x00garbage")  # corrupt (e.g. a disk error)
    files[1].write_bytes(files[1].read_bytes().replace(b"cat", b"cow").replace(b"dog", b"cow"))  # another key
    fresh = _Counting(_clip())
    again = TextClassifier(fresh)(["cat", "dog"], TEMPLATES)
    assert fresh.prompts == 4  # nothing trusted: both re-encoded
    torch.testing.assert_close(again, ref, rtol=0, atol=1e-6)
    third = _Counting(_clip())
    TextClassifier(third)(["cat", "dog"], TEMPLATES)
    assert third.prompts == 0  # and rewritten


def test_opt_out_by_env_and_argument(_ovseg_home, monkeypatch):
    TextClassifier(_clip(), disk_cache=False)(["cat"], TEMPLATES)
    assert not (_ovseg_home / "text").exists()
    monkeypatch.setenv("OVSEG_TEXT_CACHE", "0")
    TextClassifier(_clip())(["cat"], TEMPLATES)
    assert not (_ovseg_home / "text").exists()
    own = TextEmbeddingCache(_ovseg_home / "elsewhere")  # an explicit cache is used even with the env opt-out
    TextClassifier(_clip(), disk_cache=own)(["cat"], TEMPLATES)
    assert own.info()["entries"] == 1


def test_size_bound_evicts_least_recently_used(tmp_path):
    cache = TextEmbeddingCache(tmp_path, max_bytes=10**9)
    key = {"arch": "test"}
    emb = {f"q{i}": torch.randn(64) for i in range(6)}
    cache.put_many(key, TEMPLATES, emb)
    size = cache.info()["bytes"] // 6
    paths = {q: cache._path(__import__("ovseg.cache", fromlist=["_entry_key"])._entry_key(key, TEMPLATES, q))
             for q in emb}
    for i, q in enumerate(emb):  # distinct, increasing LRU times
        os.utime(paths[q], (1000 + i, 1000 + i))
    assert set(cache.get_many(key, TEMPLATES, ["q0"])) == {"q0"}  # q0 used now: the most recent
    cache.max_bytes = 3 * size + size // 2
    assert cache.evict() == 3
    left = {q for q, p in paths.items() if p.exists()}
    assert left == {"q0", "q4", "q5"} and cache.info()["bytes"] <= cache.max_bytes
    got = cache.get_many(key, TEMPLATES, list(emb))
    assert set(got) == left and torch.equal(got["q5"], emb["q5"])


def test_unwritable_home_warns_and_still_answers(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("OVSEG_HOME", str(blocker))
    monkeypatch.setattr("ovseg.cache._warned_unwritable", False)
    with caplog.at_level(logging.WARNING, logger="ovseg.cache"):
        emb = TextClassifier(_clip())(["cat"], TEMPLATES)
    assert emb.shape == (1, 32) and "cannot write" in caplog.text


def _writer(root, n_rounds, seed):
    from ovseg.cache import TextEmbeddingCache

    cache = TextEmbeddingCache(root, max_bytes=10**9)
    g = torch.Generator().manual_seed(0)  # every process writes the same values for the same query
    emb = {f"q{i}": torch.randn(128, generator=g) for i in range(20)}
    for _ in range(n_rounds):
        order = list(emb)[seed % 3::] + list(emb)[:seed % 3]
        cache.put_many({"arch": "race"}, ("{}",), {q: emb[q] for q in order})
        got = cache.get_many({"arch": "race"}, ("{}",), order)  # readers during writes see whole entries only
        for q, e in got.items():
            if not torch.equal(e, emb[q]):
                sys.exit(3)
    sys.exit(0)


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_concurrent_writers_never_expose_partial_entries(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), 15, s)) for s in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    cache = TextEmbeddingCache(tmp_path)
    assert cache.info()["entries"] == 20
    assert not list((tmp_path / "text").glob(".tmp-*"))  # every temporary file was published or removed
    assert len(cache.get_many({"arch": "race"}, ("{}",), [f"q{i}" for i in range(20)])) == 20


def test_prime_fills_memory_and_encodes_nothing():
    src = TextClassifier(_clip(), disk_cache=False)
    emb = src(["cat", "dog"], TEMPLATES)
    dst_clip = _Counting(_clip())
    dst = TextClassifier(dst_clip, disk_cache=False)
    dst.prime(["cat", "dog"], TEMPLATES, emb)
    assert torch.equal(dst(["dog", "cat"], TEMPLATES), emb.flip(0))
    assert dst_clip.prompts == 0 and dst.cache_info()["hits"] == 1
    from ovseg.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=r"\(Q=3, E\)"):
        dst.prime(["a", "b", "c"], TEMPLATES, emb)


def test_memory_lru_is_per_query_and_bounded():
    clip = _Counting(_clip())
    tc = TextClassifier(clip, disk_cache=False, cache_size=3)
    tc(["a", "b", "c", "d"], TEMPLATES)  # more queries than the bound: still answered
    assert tc.cache_info()["size"] == 3
    tc(["b", "c", "d"], TEMPLATES)
    assert clip.prompts == 8 and tc.cache_info()["hits"] == 1


def test_progress_bar_only_for_many_prompts(capsys):
    from ovseg.text import get_templates

    tc = TextClassifier(_clip(), disk_cache=False, progress=True)
    tc(["cat"], TEMPLATES)
    assert "text prompts" not in capsys.readouterr().err
    tc(["cat", "dog", "sky", "sea"], get_templates("openai_imagenet"))  # 320 prompts
    assert "text prompts" in capsys.readouterr().err
