"""Persistent text-embedding cache under ``$OVSEG_HOME`` (default ``$XDG_CACHE_HOME/ovseg`` or ``~/.cache/ovseg``).

One entry per (text-embedding procedure, CLIP text tower identity, templates, query): a small safetensors file with
the query's (E,) float32 embedding and, as metadata, its full key, which is compared on every read — an entry whose
key differs or that cannot be parsed is ignored (and overwritten by the next write), never trusted. Writes go to a
temporary file in the same folder and are published with ``os.replace`` (atomic), so concurrent processes (torchrun
ranks, parallel jobs) never read a half-written entry. The folder is bounded (``OVSEG_TEXT_CACHE_MB``, default 512):
least recently used entries are removed first. ``OVSEG_TEXT_CACHE=0`` turns the cache off.

The identity of the text tower: architecture, a digest of the built text tower's structure (layer sizes, activation,
normalisation, heads), its dtype and tokenizer, and the weights — an open_clip pretrained tag; the sha256 of a local
checkpoint file (computed once per (real path, size, mtime) and remembered under ``$OVSEG_HOME/hashes``); for random
weights the seed with the model overrides and library versions when the adapter records them, otherwise a sha256 of
the text tower's tensors.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch

logger = logging.getLogger(__name__)

__all__ = ["ENV_HOME", "ENV_TEXT_CACHE", "ENV_TEXT_CACHE_MB", "TEXT_PROCEDURE", "ovseg_home", "text_cache_enabled",
           "file_sha256", "clip_text_identity", "TextEmbeddingCache"]

ENV_HOME = "OVSEG_HOME"
ENV_TEXT_CACHE = "OVSEG_TEXT_CACHE"
ENV_TEXT_CACHE_MB = "OVSEG_TEXT_CACHE_MB"
DEFAULT_TEXT_CACHE_MB = 512.0

# Bump when the text-embedding procedure changes (templates filling, normalisation, averaging): old entries then
# never match again.
TEXT_PROCEDURE = "ovseg-text-1: L2-normalised mean over templates of L2-normalised open_clip prompt embeddings"

_SUFFIX = ".safetensors"
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 3600.0
_warned_unwritable = False


def ovseg_home() -> Path:
    """``$OVSEG_HOME``, else ``$XDG_CACHE_HOME/ovseg``, else ``~/.cache/ovseg`` (as ``TORCH_HOME``/``HF_HOME``)."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ovseg"


def text_cache_enabled() -> bool:
    """False when ``OVSEG_TEXT_CACHE`` is ``0``, ``false``, ``off`` or ``no``."""
    return os.environ.get(ENV_TEXT_CACHE, "1").strip().lower() not in ("0", "false", "off", "no")


def _max_bytes_from_env() -> int:
    raw = os.environ.get(ENV_TEXT_CACHE_MB)
    if raw is None or not raw.strip():
        return int(DEFAULT_TEXT_CACHE_MB * 2**20)
    try:
        mb = float(raw)
        if mb < 0:
            raise ValueError
    except ValueError:
        logger.warning("%s=%r is not a number of megabytes >= 0; using %g", ENV_TEXT_CACHE_MB, raw,
                       DEFAULT_TEXT_CACHE_MB)
        mb = DEFAULT_TEXT_CACHE_MB
    return int(mb * 2**20)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and publish it with ``os.replace`` (atomic on POSIX and
    Windows): readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    try:
        with open(tmp, "xb") as f:  # a new, unique file; permissions follow the umask (shared caches stay readable)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def file_sha256(path: Union[str, os.PathLike], *, home: Optional[Path] = None) -> str:
    """sha256 of a file, remembered under ``<home>/hashes`` by (real path, size, mtime_ns): a multi-GB checkpoint
    is hashed once, and again only when it changes."""
    real = os.path.realpath(os.fspath(path))
    st = os.stat(real)
    stamp = {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    record = (home or ovseg_home()) / "hashes" / (hashlib.sha256(real.encode("utf-8")).hexdigest()[:32] + ".json")
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        if {k: saved.get(k) for k in stamp} == stamp and isinstance(saved.get("sha256"), str):
            return saved["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    logger.info("hashing %s (%.1f GB) for the text-embedding cache; remembered until the file changes",
                real, st.st_size / 1e9)
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    try:
        _atomic_write(record, _canonical(dict(stamp, sha256=digest)).encode("utf-8"))
    except OSError as e:  # read-only home: hash again next time
        logger.debug("could not remember the hash of %s: %s", real, e)
    return digest


def _text_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The text tower's tensors of an open_clip model (everything but the image tower and the logit scale/bias)."""
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}


def _tensors_sha256(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def _text_structure(model: torch.nn.Module, tokenizer: Any) -> Dict[str, Any]:
    """What, besides the weights, decides a text embedding: the text tower's modules (sizes, activation,
    normalisation: their repr), its attention heads, pooling, dtype and the tokenizer."""
    if hasattr(model, "text"):
        mods = [model.text]
    else:
        mods = [getattr(model, n) for n in ("token_embedding", "transformer", "ln_final") if hasattr(model, n)]
    heads = [int(m.num_heads) for mod in mods for m in mod.modules() if hasattr(m, "num_heads")]
    first = next(iter(_text_state(model).values()), None)
    desc = {
        "class": type(model).__name__,
        "modules": "\n".join(repr(m) for m in mods),
        "heads": heads,
        "pool": str(getattr(model, "text_pool_type", getattr(getattr(model, "text", None), "pool_type", ""))),
        "eos": getattr(model, "text_eos_id", getattr(getattr(model, "text", None), "eos_id", None)),
        "dtype": str(first.dtype) if first is not None else "",
        "tokenizer": f"{type(tokenizer).__module__}.{type(tokenizer).__name__}"
                     f"/{getattr(tokenizer, 'context_length', '')}",
    }
    return {"structure": hashlib.sha256(_canonical(desc).encode("utf-8")).hexdigest(), "dtype": desc["dtype"],
            "tokenizer": desc["tokenizer"]}


def _activation(model: torch.nn.Module) -> str:
    for m in model.modules():
        if type(m).__name__ in ("QuickGELU", "GELU", "SiLU", "ReLU"):
            return type(m).__name__ + (f"({m.approximate})" if hasattr(m, "approximate") else "")
    return ""


def clip_text_identity(clip: Any, *, home: Optional[Path] = None) -> Optional[Dict[str, Any]]:
    """JSON-able identity of a CLIP adapter's text side for the cache key, or None when it cannot be pinned down
    (then nothing is cached on disk).

    Reads ``clip.identity`` (``{"arch", "source": "tag"|"file"|"random", "tag", "path", "activation", "seed",
    "model_kwargs"}``) when the adapter has it, else ``clip.arch`` / ``clip.weights``.
    """
    import open_clip

    model = getattr(clip, "model", None)
    if not isinstance(model, torch.nn.Module):  # a registered CLIP that is not an open_clip model
        return None
    ident = getattr(clip, "identity", None)
    if isinstance(ident, dict):
        arch, source = ident.get("arch"), ident.get("source")
        tag, path, seed = ident.get("tag"), ident.get("path"), ident.get("seed")
        model_kwargs = ident.get("model_kwargs")
        activation = ident.get("activation") or _activation(model)
    else:
        arch, weights = getattr(clip, "arch", None), str(getattr(clip, "weights", ""))
        seed = model_kwargs = None
        activation = _activation(model)
        if weights == "random":
            source, tag, path = "random", None, None
        elif weights and os.path.isfile(os.path.expanduser(weights)):
            source, tag, path = "file", None, os.path.expanduser(weights)
        elif weights and weights != "custom":
            source, tag, path = "tag", weights, None
        else:
            return None
    key: Dict[str, Any] = {"arch": arch, "source": source, "activation": activation,
                           "model_kwargs": model_kwargs, **_text_structure(model, getattr(clip, "tokenizer", None))}
    if source == "tag" and tag:
        key["tag"] = tag
    elif source == "file" and path:
        key["sha256"] = file_sha256(path, home=home)
    elif source == "random":
        if seed is not None:  # open_clip's seeded init: same tensors for the same versions
            key.update(seed=seed, torch=torch.__version__, open_clip=open_clip.__version__)
        else:
            key["tensors_sha256"] = _tensors_sha256(_text_state(model))
    else:
        return None
    return key


def _entry_key(model_key: Dict[str, Any], templates: Sequence[str], query: str) -> str:
    return _canonical({"procedure": TEXT_PROCEDURE, "model": model_key, "templates": list(templates), "query": query})


def _read_entry(path: Path, key: str) -> Optional[torch.Tensor]:
    """The entry's embedding if the file parses and its stored key equals ``key``; None otherwise."""
    from safetensors.torch import load

    data = path.read_bytes()
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    if header.get("__metadata__", {}).get("ovseg_key") != key:
        return None
    emb = load(data).get("embedding")
    if emb is None or emb.dim() != 1 or emb.dtype != torch.float32 or not bool(torch.isfinite(emb).all()):
        return None
    return emb


class TextEmbeddingCache:
    """Per-query text embeddings on disk (see the module docstring).

    Args:
        root: the ovseg home (default :func:`ovseg_home`); entries live in ``<root>/text``.
        max_bytes: size bound (default ``OVSEG_TEXT_CACHE_MB``, 512 MB); least recently used entries go first.
    """

    def __init__(self, root: Union[str, os.PathLike, None] = None, *, max_bytes: Optional[int] = None):
        self.root = Path(root).expanduser() if root is not None else ovseg_home()
        self.dir = self.root / "text"
        self.max_bytes = _max_bytes_from_env() if max_bytes is None else int(max_bytes)

    def __repr__(self) -> str:
        return f"TextEmbeddingCache('{self.dir}', max_bytes={self.max_bytes})"

    def _path(self, key: str) -> Path:
        return self.dir / (hashlib.sha256(key.encode("utf-8")).hexdigest() + _SUFFIX)

    def get_many(self, model_key: Dict[str, Any], templates: Sequence[str],
                 queries: Iterable[str]) -> Dict[str, torch.Tensor]:
        """{query: (E,) float32} for the queries with a valid entry; a hit refreshes the entry's LRU time."""
        found = {}
        for q in queries:
            key = _entry_key(model_key, templates, q)
            path = self._path(key)
            try:
                emb = _read_entry(path, key)
            except FileNotFoundError:
                continue
            except Exception as e:  # corrupt or unreadable: ignore, the next write replaces it
                logger.debug("ignoring unreadable text-cache entry %s: %s", path, e)
                continue
            if emb is None:
                logger.debug("ignoring text-cache entry %s: its key does not match", path)
                continue
            found[q] = emb
            try:
                os.utime(path)
            except OSError:
                pass
        return found

    def put_many(self, model_key: Dict[str, Any], templates: Sequence[str], embeddings: Dict[str, torch.Tensor]) -> int:
        """Store {query: (E,) embedding}; returns how many were written (0 when the folder is not writable)."""
        global _warned_unwritable
        from safetensors.torch import save

        if self.max_bytes <= 0:
            return 0
        written = 0
        try:
            for q, emb in embeddings.items():
                key = _entry_key(model_key, templates, q)
                data = save({"embedding": emb.detach().float().cpu().contiguous()}, metadata={"ovseg_key": key})
                _atomic_write(self._path(key), data)
                written += 1
        except OSError as e:
            if not _warned_unwritable:
                _warned_unwritable = True
                logger.warning("text-embedding cache disabled for this process: cannot write to %s (%s); set %s "
                               "to a writable folder or %s=0", self.dir, e, ENV_HOME, ENV_TEXT_CACHE)
            return written
        self.evict()
        return written

    def _scan(self) -> Tuple[list, int]:
        """[(mtime, size, path)] of the entries and their total size; removes stale temporary files."""
        entries, total, now = [], 0, time.time()
        try:
            it = os.scandir(self.dir)
        except FileNotFoundError:
            return [], 0
        with it:
            for e in it:
                try:
                    st = e.stat()
                except OSError:
                    continue
                if e.name.startswith(_TMP_PREFIX):
                    if now - st.st_mtime > _STALE_TMP_SECONDS:  # left by a killed writer
                        try:
                            os.unlink(e.path)
                        except OSError:
                            pass
                    continue
                if e.name.endswith(_SUFFIX):
                    entries.append((st.st_mtime, st.st_size, e.path))
                    total += st.st_size
        return entries, total

    def evict(self) -> int:
        """Remove least recently used entries until the folder fits in ``max_bytes``; returns how many."""
        entries, total = self._scan()
        if total <= self.max_bytes:
            return 0
        removed = 0
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:  # another process evicted it
                pass
            except OSError:
                continue
            total -= size
        return removed

    def info(self) -> Dict[str, Any]:
        """{"location", "entries", "bytes", "max_bytes", "enabled"}."""
        entries, total = self._scan()
        return {"location": str(self.dir), "entries": len(entries), "bytes": total, "max_bytes": self.max_bytes,
                "enabled": text_cache_enabled() and self.max_bytes > 0}

    def clear(self) -> Tuple[int, int]:
        """Remove every entry (and the remembered file hashes); returns (files removed, bytes freed)."""
        entries, total = self._scan()
        n = 0
        for _, _, path in entries:
            try:
                os.unlink(path)
                n += 1
            except OSError:
                pass
        hashes = self.root / "hashes"
        if hashes.is_dir():
            for p in hashes.glob("*.json"):
                try:
                    p.unlink()
                except OSError:
                    pass
        return n, total
