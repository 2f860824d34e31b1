"""Safe checkpoint reading (never unpickles arbitrary code), seeded random init, and actionable download errors."""
from __future__ import annotations

import contextlib
import os
import zipfile
from pathlib import Path
from typing import Dict, Iterator, Optional, Union

import torch

from .errors import PathNotFoundError, WeightsUnavailableError

__all__ = ["WeightsUnavailableError", "load_state_dict_file", "seeded", "resolve_path", "is_torchscript_archive",
           "muted_root_logger"]


def resolve_path(path: Union[str, os.PathLike], option: str) -> Path:
    """Expand ``~`` and check the file exists; FileNotFoundError names the option that took it."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise PathNotFoundError(f"{option}: checkpoint file not found: '{path}'")
    return p


def is_torchscript_archive(path: Path) -> bool:
    """OpenAI's released CLIP ``.pt`` files are TorchScript archives (zip with a ``code/`` folder)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in n or n.endswith("constants.pkl") for n in zf.namelist())


def load_state_dict_file(path: Union[str, os.PathLike], *, option: str = "weights") -> Dict[str, torch.Tensor]:
    """Read a checkpoint's tensors without executing pickled code.

    ``.safetensors`` via safetensors; TorchScript archives via ``torch.jit.load`` (its restricted loader builds
    TorchScript objects only); anything else via ``torch.load(weights_only=True)``. Common wrappers
    (``state_dict``, ``model``, ``module.`` prefixes) are removed; nested training checkpoints are left to callers.
    """
    p = resolve_path(path, option)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(p), device="cpu")
    elif is_torchscript_archive(p):
        sd = torch.jit.load(str(p), map_location="cpu").state_dict()
        sd = {k: v for k, v in sd.items()}
        sd["__torchscript__"] = torch.zeros(())  # marker for callers that care (OpenAI CLIP format)
    else:
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling refused or not a checkpoint at all
            raise ValueError(
                f"{option}: could not read '{path}' as a checkpoint with torch.load(weights_only=True) "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). ovseg never unpickles "
                "arbitrary objects; re-save the tensors with torch.save(state_dict) or safetensors."
            ) from None
    if not isinstance(sd, dict):
        raise ValueError(f"{option}: '{path}' holds a {type(sd).__name__}, not a state dict")
    for wrapper in ("state_dict", "model"):
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


@contextlib.contextmanager
def muted_root_logger() -> Iterator[None]:
    """Drop records that libraries log straight to the root logger (open_clip logs download failures and
    "initialized randomly" there) while ovseg raises or states something clearer itself."""
    import logging

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
