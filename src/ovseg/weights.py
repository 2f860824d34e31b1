"""The one place where a weights argument becomes loaded weights (CLIP, timm VFMs, SAM, Stable Diffusion).

- :func:`parse_weights`: what a ``clip_weights`` / ``vfm_weights`` value means: ``None`` (the official weights),
  ``"random"`` (seeded random initialisation), a pretrained tag, or a local file or folder.
- :func:`load_state_dict_file`: reads a checkpoint without executing pickled code.
- :func:`strict_load`: every missing or unexpected key and every shape mismatch is an ``InvalidInputError`` that
  counts them, shows examples and names the expected release file.
- :func:`fetch_hub_file`, :func:`check_hub_reachable`, :func:`fetch_url` and :func:`downloading`: downloads that
  use the cache without network when it has the file, stop at the first failed connection (no retry storm),
  and turn only download/IO failures into a :class:`WeightsUnavailableError` that names the file to fetch, where,
  and the exact call that loads it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch

from ._registry import suggest
from .errors import InvalidInputError, InvalidTypeError, PathNotFoundError, WeightsUnavailableError

logger = logging.getLogger(__name__)

__all__ = [
    "WeightsUnavailableError", "WeightsSource", "parse_weights", "resolve_path", "is_torchscript_archive",
    "load_state_dict_file", "strict_load", "check_constructor", "download_errors", "offline_mode", "hub_cache_dir",
    "fetch_hub_file", "check_hub_reachable", "fetch_url", "downloading", "unavailable_error", "seeded",
    "muted_root_logger",
]

RANDOM = "random"


# ---------------------------------------------------------------------------------------------- what the value means
@dataclass(frozen=True)
class WeightsSource:
    """A parsed weights argument.

    Attributes:
        kind: ``"default"`` (``None``: the official weights), ``"random"``, ``"tag"`` or ``"path"``.
        tag: the pretrained tag (kind ``"tag"``).
        path: the existing local file or folder, ``~`` expanded, not resolved through symlinks (kind ``"path"``).
    """

    kind: str
    tag: Optional[str] = None
    path: Optional[Path] = None


def _looks_like_path(value: Union[str, os.PathLike]) -> bool:
    s = str(value)
    return (isinstance(value, os.PathLike) or os.sep in s or (os.altsep is not None and os.altsep in s)
            or s.startswith("~") or bool(os.path.splitext(s)[1]) or os.path.exists(s))


def parse_weights(
    value: Any,
    *,
    option: str,
    tags: Sequence[str] = (),
    what: str = "the model",
) -> WeightsSource:
    """Dispatch a weights argument.

    Args:
        value: ``None``, ``"random"``, one of ``tags``, or a path to an existing file or folder.
        option: the argument's name for messages (``clip_weights``, ``vfm_weights``).
        tags: the pretrained tags the model accepts (empty when it has none).
        what: the model, for messages (``"'ViT-B-16'"``, ``"VFM 'dino_b8'"``).

    Raises:
        InvalidTypeError: ``value`` is neither None, a string nor a path.
        PathNotFoundError: ``value`` looks like a path that does not exist.
        InvalidInputError: ``value`` is an unknown tag (with a did-you-mean suggestion).
    """
    if value is None:
        return WeightsSource("default")
    if isinstance(value, str) and value == RANDOM:
        return WeightsSource("random")
    allowed = "None, 'random', " + ("a pretrained tag, " if tags else "") + "or a local file or folder"
    if not isinstance(value, (str, os.PathLike)):
        raise InvalidTypeError(f"{option} must be {allowed}; got {type(value).__name__} {value!r}")
    if isinstance(value, str) and value in tags:
        return WeightsSource("tag", tag=value)
    if _looks_like_path(value):
        return WeightsSource("path", path=resolve_path(value, option))
    listing = f" pretrained tags of {what}: {', '.join(tags)}" if tags else ""
    raise InvalidInputError(
        f"{option} '{value}' is not {'a pretrained tag of ' + what + ', ' if tags else ''}an existing file or "
        f"folder, or 'random';{suggest(str(value), tags)}{listing}"
    )


def resolve_path(path: Union[str, os.PathLike], option: str) -> Path:
    """Expand ``~`` and check that the file or folder exists (``PathNotFoundError`` names the option).

    The path is made absolute but symlinks are kept: a file in a Hugging Face cache snapshot keeps the
    ``models--org--name`` folder in its path."""
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    if not p.exists():
        raise PathNotFoundError(f"{option}: checkpoint file or folder not found: '{path}'")
    return p


# ---------------------------------------------------------------------------------------------- reading files
def is_torchscript_archive(path: Union[str, os.PathLike]) -> bool:
    """True for TorchScript archives such as OpenAI's released CLIP ``.pt`` files (a zip with a ``code/``
    folder and ``constants.pkl``; ``torch.save`` zips have neither)."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in n or n.endswith("constants.pkl") for n in zf.namelist())


def load_state_dict_file(path: Union[str, os.PathLike], *, option: str = "weights") -> Dict[str, torch.Tensor]:
    """Read a checkpoint's tensors without executing pickled code.

    ``.safetensors`` via safetensors; TorchScript archives via ``torch.jit.load`` (its restricted loader builds
    TorchScript objects only); anything else via ``torch.load(weights_only=True)``. Common wrappers
    (``state_dict``, ``model``, ``module.`` prefixes) are removed; nested training checkpoints are left to callers.

    Raises:
        PathNotFoundError: the file does not exist.
        InvalidInputError: a folder, a file torch cannot read safely, or something other than a state dict.
    """
    p = resolve_path(path, option)
    if p.is_dir():
        raise InvalidInputError(f"{option}: '{path}' is a folder; pass the checkpoint file inside it")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(p), device="cpu")
    elif is_torchscript_archive(p):
        with warnings.catch_warnings():  # torch >= 2.9 marks torch.jit as deprecated; the archive format is not
            warnings.simplefilter("ignore", FutureWarning)
            sd = dict(torch.jit.load(str(p), map_location="cpu").state_dict())
    else:
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling refused, or not a checkpoint at all
            raise InvalidInputError(
                f"{option}: could not read '{path}' as a checkpoint with torch.load(weights_only=True) "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). ovseg never unpickles "
                "arbitrary objects; re-save the tensors with torch.save(state_dict) or safetensors."
            ) from e
    if not isinstance(sd, dict):
        raise InvalidInputError(f"{option}: '{path}' holds a {type(sd).__name__}, not a state dict")
    for wrapper in ("state_dict", "model"):
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def strict_load(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    option: str,
    value: Any,
    target: str,
    expected: str,
) -> None:
    """Load ``state_dict`` into ``model`` only if every key and shape matches.

    Args:
        option, value: the argument and its value, for the message (``clip_weights``, the path).
        target: what the weights should fit (``"architecture 'ViT-B-16'"``, ``"VFM 'dino_b8'"``).
        expected: the file that fits (``"the official dino_vitbase8_pretrain.pth"``), for the message.

    Raises:
        InvalidInputError: counts and examples of the missing keys, unexpected keys and shape mismatches.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: {tuple(state_dict[k].shape)} in the file, {tuple(own[k].shape)} in the model"
                  for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = [f"{len(missing)} missing keys (e.g. {missing[:3]})", f"{len(unexpected)} unexpected keys "
                 f"(e.g. {unexpected[:3]})", f"{len(mismatched)} shape mismatches (e.g. {mismatched[:2]})"]
        raise InvalidInputError(f"{option} '{value}' does not fit {target}: {', '.join(parts)}; expected {expected}")
    model.load_state_dict(state_dict, strict=True)


def check_constructor(build: Callable[[], Any], model_kwargs: Optional[Mapping[str, Any]]) -> None:
    """Run a model constructor on the meta device (no memory, no initialisation cost) so that a bad
    ``model_kwargs`` raises the constructor's own TypeError/ValueError before any download starts.

    Nothing is checked without ``model_kwargs``. A failure that only the meta device causes
    (``NotImplementedError``/``RuntimeError``) is inconclusive and ignored: the real construction repeats it."""
    if not model_kwargs:
        return
    with torch.device("meta"), muted_root_logger():
        try:
            build()
        except (NotImplementedError, RuntimeError):
            pass


# ---------------------------------------------------------------------------------------------- downloads
def download_errors() -> Tuple[type, ...]:
    """The exceptions that mean "the download failed": OSError (urllib, requests, socket, the file system and
    huggingface_hub's LocalEntryNotFoundError/HfHubHTTPError/OfflineModeIsEnabled) and the transport errors of
    the HTTP clients huggingface_hub uses (httpx/httpx2 errors are not OSErrors). Construction errors
    (TypeError, ValueError, ...) are never among them."""
    errors = [OSError]
    for module, name in (("huggingface_hub.errors", "EntryNotFoundError"), ("httpx", "HTTPError"),
                         ("httpx2", "HTTPError"), ("requests", "RequestException"),
                         ("huggingface_hub.utils", "EntryNotFoundError")):
        cls = getattr(sys.modules.get(module), name, None)  # only modules already imported can have raised
        if isinstance(cls, type) and issubclass(cls, BaseException):
            errors.append(cls)
    return tuple(dict.fromkeys(errors))


def offline_mode() -> bool:
    """huggingface_hub's ``HF_HUB_OFFLINE`` (read once at its import, as huggingface_hub itself does)."""
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_cache_dir(cache_dir: Optional[str] = None) -> str:
    """The Hugging Face cache folder in use (``cache_dir`` or ``HF_HUB_CACHE``)."""
    from huggingface_hub import constants

    return str(cache_dir or constants.HF_HUB_CACHE)


def _entry_not_found() -> type:
    try:
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:  # huggingface_hub < 0.24
        from huggingface_hub.utils import EntryNotFoundError
    return EntryNotFoundError


def check_hub_reachable(repo_id: str, filename: str, *, revision: Optional[str] = None) -> None:
    """One HEAD request for ``filename`` in ``repo_id``, without huggingface_hub's retries: a connection
    failure (or an HTTP error) is raised at once."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision))


def fetch_hub_file(repo_id: str, filenames: Sequence[str], *, cache_dir: Optional[str] = None) -> str:
    """Local path of the first of ``filenames`` that ``repo_id`` (``org/name[@revision]``) has.

    A file already in the Hugging Face cache is used without network. Otherwise, unless ``HF_HUB_OFFLINE`` is
    set, one HEAD request per candidate name (no retries) finds the file, which is then downloaded; the first
    failed connection ends the attempt. Raises only download/IO errors (see :func:`download_errors`).
    """
    from huggingface_hub import hf_hub_download

    not_found = _entry_not_found()
    repo, _, revision = repo_id.partition("@")
    revision = revision or None
    for name in filenames:
        try:
            return hf_hub_download(repo, name, revision=revision, cache_dir=cache_dir, local_files_only=True)
        except (not_found, OSError):
            continue
    if offline_mode():
        raise FileNotFoundError(f"{' / '.join(filenames)} of {repo} is not in the Hugging Face cache "
                                f"({hub_cache_dir(cache_dir)})")
    last: Optional[BaseException] = None
    for name in filenames:
        try:
            check_hub_reachable(repo, name, revision=revision)
        except not_found as e:  # the repo has no file of this name: try the next one
            last = e
            continue
        logger.info("downloading %s from the Hugging Face repo %s", name, repo)
        return hf_hub_download(repo, name, revision=revision, cache_dir=cache_dir)
    assert last is not None
    raise last


def fetch_url(url: str, *, cache_dir: Optional[str] = None) -> str:
    """Local path of ``url``'s file in torch.hub's checkpoint folder (or ``cache_dir``), downloaded once with
    a single attempt when missing (never under ``HF_HUB_OFFLINE``)."""
    folder = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    target = folder / os.path.basename(url)
    if target.is_file():
        return str(target)
    if offline_mode():
        raise FileNotFoundError(f"{target.name} is not in {folder} and HF_HUB_OFFLINE=1 forbids downloading it")
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s", url)
    torch.hub.download_url_to_file(url, str(target), progress=False)
    return str(target)


def unavailable_error(what: str, *, fetch: str, load: str, cause: BaseException,
                      cache_dir: Optional[str] = None) -> WeightsUnavailableError:
    """The offline/download error: why it failed, the file to fetch and where, and the exact call that loads it.

    Args:
        what: the weights (``"CLIP 'ViT-B-16' / 'openai'"``, ``"VFM 'dino_b8'"``).
        fetch: the file(s) and where to get them.
        load: the exact Python call and CLI flags that load the downloaded file.
    """
    detail = " ".join(str(cause).split())
    detail = f"{type(cause).__name__}: {detail[:240]}" if detail else type(cause).__name__
    if offline_mode():
        why = (f"HF_HUB_OFFLINE=1 is set and they are not in the local cache ({hub_cache_dir(cache_dir)}) "
               f"({detail})")
    else:
        why = (f"they are not in the local cache ({hub_cache_dir(cache_dir)}) and the download failed at its "
               f"first attempt ({detail}); ovseg does not retry. With no network, set HF_HUB_OFFLINE=1: weights "
               "already in the cache then load without any connection attempt")
    return WeightsUnavailableError(
        f"could not load the weights of {what}: {why}. On a connected machine download {fetch}, then load it "
        f"with {load}."
    )


@contextlib.contextmanager
def downloading(what: str, *, fetch: str, load: str, cache_dir: Optional[str] = None) -> Iterator[None]:
    """Turn the download/IO failures of the block (and only those) into :func:`unavailable_error`, chained
    with ``from``. Wrap fetching only, never model construction."""
    try:
        yield
    except download_errors() as e:
        raise unavailable_error(what, fetch=fetch, load=load, cause=e, cache_dir=cache_dir) from e


# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def muted_root_logger() -> Iterator[None]:
    """Drop records that libraries log straight to the root logger (open_clip logs "initialized randomly"
    there) while ovseg states something clearer itself."""
    root = logging.getLogger()
    drop = lambda record: False  # noqa: E731
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


@contextlib.contextmanager
def seeded(seed: Optional[int]) -> Iterator[None]:
    """Run a block with a fixed CPU RNG seed without disturbing the caller's global RNG state."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
