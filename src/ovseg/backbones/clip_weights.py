"""Which CLIP weights a local file holds, and so which activation its architecture must use.

OpenAI's CLIP (and MetaCLIP, DFN, some LAION-400M runs) were trained with QuickGELU, most LAION/DataComp weights
with GELU; open_clip records this per pretrained tag (``quick_gelu`` in its pretrained table) and in its
``-quickgelu`` architecture names. A plain state dict does not say which it is, and the wrong activation moves
every logit, so a local file is only loaded when its activation is known:

1. ``clip_tag`` names the pretrained tag the file holds; the tag's config decides.
2. Otherwise the file is recognised: OpenAI's TorchScript ``.pt`` and OpenAI-layout state dicts with
   ``input_resolution``/``context_length``/``vocab_size`` entries (QuickGELU); a file in a Hugging Face cache
   (``models--org--name``) or in a downloaded hub folder (``open_clip_config.json`` beside it, folder named like
   the repo) maps to the tag of that repo in open_clip's table; an ``open_clip_config.json`` with ``quick_gelu``.
3. Otherwise a ``-quickgelu`` architecture fixes QuickGELU, and an architecture whose tags all agree uses theirs.
4. Otherwise (e.g. ``ViT-B-16``, whose tags disagree) an ``InvalidInputError`` names both choices and the exact
   call for each.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import InvalidInputError
from ..weights import downloading, fetch_hub_file, offline_mode

logger = logging.getLogger(__name__)

__all__ = ["KNOWN_CLIP_WEIGHTS", "tag_activation", "find_checkpoint", "resolve_file_activation",
           "fetch_tag_file", "download_hint", "load_call"]

# The CLIP weights that ovseg's presets, hints and docs name (``ovseg doctor`` lists them).
KNOWN_CLIP_WEIGHTS: Tuple[Tuple[str, str], ...] = (
    ("ViT-B-16", "openai"), ("ViT-L-14", "openai"), ("ViT-H-14", "laion2b_s32b_b79k"),
    ("ViT-B-16-quickgelu", "metaclip_fullcc"), ("ViT-L-14-quickgelu", "metaclip_fullcc"),
)

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_PREFERRED_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                    "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_NAMES = {True: "QuickGELU", False: "GELU"}


def _pretrained_cfg(arch: str, tag: str) -> dict:
    import open_clip

    return open_clip.get_pretrained_cfg(arch, tag) or {}


def _tag_quick_gelu(arch: str, tag: str) -> bool:
    return bool(_pretrained_cfg(arch, tag).get("quick_gelu", False))


def tag_activation(arch: str, tag: str) -> str:
    """``"quick_gelu"`` or ``"gelu"``: the activation open_clip's pretrained table records for ``arch``/``tag``
    (a ``-quickgelu`` architecture is QuickGELU whatever the tag)."""
    import open_clip

    arch_qg = bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))
    return "quick_gelu" if arch_qg or _tag_quick_gelu(arch, tag) else "gelu"


def _split_hub(hub: str) -> Tuple[str, str]:
    """open_clip's ``hf_hub`` entry ``org/name/[filename]`` -> (repo id, filename or "")."""
    parts = hub.strip("/").split("/")
    return "/".join(parts[:2]), "/".join(parts[2:])


def _hub_candidates(filename: str) -> List[str]:
    """The file names open_clip tries in a hub repo, safetensors first."""
    if filename in ("", "open_clip_pytorch_model.bin"):
        return ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def load_call(arch: str, tag: str, path: Optional[str] = None) -> str:
    """The exact Python call and CLI flags that load the local file ``path`` (default: a ``PATH`` placeholder)
    holding ``arch``/``tag``."""
    py, sh = ("PATH", "PATH") if path is None else (json.dumps(path), shlex.quote(path))
    return (f'Segmenter(..., clip="{arch}", clip_weights={py}, clip_tag="{tag}") '
            f"(CLI: --clip {arch} --clip-weights {sh} --clip-tag {tag})")


def download_hint(arch: str, tag: str) -> str:
    """The release file(s) of ``arch``/``tag`` and where to download them."""
    cfg = _pretrained_cfg(arch, tag)
    where = []
    if cfg.get("hf_hub"):
        repo, filename = _split_hub(cfg["hf_hub"])
        names = _hub_candidates(filename)
        alt = f" (or {names[1]})" if len(names) > 1 else ""
        where.append(f"{names[0]}{alt} from https://huggingface.co/{repo}")
    if cfg.get("url"):
        where.append(f"{os.path.basename(cfg['url'])} from {cfg['url']}")
    return " or ".join(where) if where else "the file from the open_clip model zoo"


def fetch_tag_file(arch: str, tag: str, *, cache_dir: Optional[str] = None) -> str:
    """Local path of the weights file of ``arch``/``tag``: from the cache without network when it is there,
    else downloaded (hub first, as open_clip does), failing at the first failed connection with a
    ``WeightsUnavailableError`` that names the file and the exact call that loads it once downloaded."""
    cfg = _pretrained_cfg(arch, tag)
    if cfg.get("file"):
        return cfg["file"]
    with downloading(f"CLIP '{arch}' / '{tag}'", fetch=download_hint(arch, tag), load=load_call(arch, tag),
                     cache_dir=cache_dir):
        if cfg.get("hf_hub"):
            repo, filename = _split_hub(cfg["hf_hub"])
            return fetch_hub_file(repo, _hub_candidates(filename), cache_dir=cache_dir)
        if cfg.get("url"):
            from open_clip.pretrained import download_pretrained_from_url

            target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
            if offline_mode() and not target.is_file():
                raise FileNotFoundError(f"{target} does not exist and HF_HUB_OFFLINE=1 forbids downloading it")
            return download_pretrained_from_url(cfg["url"], cache_dir=cache_dir)
    raise InvalidInputError(f"open_clip lists no download for CLIP '{arch}' / '{tag}'")


# ---------------------------------------------------------------------------------------------- local files
def find_checkpoint(path: Path) -> Path:
    """The checkpoint file for a ``clip_weights`` path: the file itself, or the one checkpoint in a folder
    (a downloaded hub folder, a Hugging Face cache snapshot, or a cache repo folder ``models--org--name``,
    whose ``refs/main`` snapshot is used). open_clip's own file names are preferred, safetensors first."""
    if path.is_file():
        return path
    folder = path
    if (folder / "snapshots").is_dir():  # a cache repo folder: models--org--name/{refs,snapshots,blobs}
        snaps = sorted(p for p in (folder / "snapshots").iterdir() if p.is_dir())
        ref = folder / "refs" / "main"
        main = folder / "snapshots" / ref.read_text().strip() if ref.is_file() else None
        if main is not None and main.is_dir():
            folder = main
        elif len(snaps) == 1:
            folder = snaps[0]
        else:
            raise InvalidInputError(f"clip_weights: '{path}' holds {len(snaps)} snapshots and no refs/main; pass "
                                    f"one snapshot folder or the checkpoint file")
    for name in _PREFERRED_FILES:
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _SUFFIXES)
    if len(files) == 1:
        return files[0]
    found = ", ".join(p.name for p in files) or "none"
    raise InvalidInputError(f"clip_weights: folder '{path}' does not hold exactly one checkpoint file "
                            f"({', '.join(_SUFFIXES)}; found: {found}); pass the file itself")


@dataclass(frozen=True)
class _Recognised:
    quick_gelu: bool
    tag: Optional[str]  # the pretrained tag, when the evidence names one
    reason: str
    names_repo: bool = False  # the evidence is the hub repo (so the tag itself is known, not only the layout)


def _family_tags(arch: str) -> Dict[str, Tuple[str, bool, str]]:
    """tag -> (architecture it belongs to, quick_gelu, hub repo) for ``arch`` and its ``-quickgelu`` sibling
    (``arch``'s own tags first)."""
    import open_clip

    base = arch[: -len("-quickgelu")] if arch.endswith("-quickgelu") else arch
    family = [arch] + [a for a in (base, base + "-quickgelu") if a != arch and a in open_clip.list_models()]
    table: Dict[str, Tuple[str, bool, str]] = {}
    for a in family:
        for t in open_clip.list_pretrained_tags_by_model(a):
            cfg = _pretrained_cfg(a, t)
            repo = _split_hub(cfg["hf_hub"])[0] if cfg.get("hf_hub") else ""
            table.setdefault(t, (a, bool(cfg.get("quick_gelu", False)), repo))
    return table


def _hub_repo_of(file: Path, table: Mapping[str, Tuple[str, bool, str]]) -> Optional[Tuple[str, str]]:
    """(hub repo id, how it was found) for a file in a Hugging Face cache or a downloaded hub folder."""
    for part in file.parts:
        bits = part.split("--", 2)
        if len(bits) == 3 and bits[0] == "models":
            repo = f"{bits[1]}/{bits[2]}"
            return repo, f"it lies in the Hugging Face cache of '{repo}'"
    folder = file.parent
    if (folder / "open_clip_config.json").is_file():
        for _, _, repo in table.values():
            if repo and repo.split("/")[-1].lower() == folder.name.lower():
                return repo, f"its folder '{folder.name}' is a download of the hub repo '{repo}'"
    return None


def _recognise(arch: str, file: Path, keys: Sequence[str], torchscript: bool) -> List[_Recognised]:
    """Every piece of evidence about the file's weights (possibly none, possibly contradictory)."""
    table = _family_tags(arch)
    openai = "openai" if "openai" in table else None
    found = []
    if torchscript:
        found.append(_Recognised(True, openai, "it is a TorchScript archive, OpenAI's release format"))
    elif any(k in keys for k in OPENAI_EXTRA_KEYS):
        found.append(_Recognised(True, openai, "it has OpenAI's input_resolution/context_length/vocab_size entries"))
    located = _hub_repo_of(file, table)
    if located is not None:
        repo, how = located
        for tag, (_, qg, r) in table.items():
            if r.lower() == repo.lower():
                found.append(_Recognised(qg, tag, f"{how} (open_clip tag '{tag}')", names_repo=True))
                break
    config = file.parent / "open_clip_config.json"
    if config.is_file():
        try:
            model_cfg = json.loads(config.read_text(encoding="utf-8")).get("model_cfg", {})
        except (OSError, ValueError, AttributeError):
            model_cfg = {}
        if isinstance(model_cfg, dict) and "quick_gelu" in model_cfg:
            qg = bool(model_cfg["quick_gelu"])
            found.append(_Recognised(qg, None, f"its open_clip_config.json sets quick_gelu={str(qg).lower()}"))
    return found


def _ambiguous(arch: str, value: str, quick: List[str], gelu: List[str]) -> InvalidInputError:
    qt = "openai" if "openai" in quick else quick[0]
    gt = next((t for t in gelu if t.startswith("laion2b")), gelu[0])

    def eg(tag: str) -> str:
        return " (OpenAI's weights)" if tag == "openai" else " (LAION's weights)" if tag.startswith("laion") else ""

    def some(tags: List[str]) -> str:
        return ", ".join(tags[:4]) + (f", ... ({len(tags) - 4} more)" if len(tags) > 4 else "")

    return InvalidInputError(
        f"clip_weights '{value}': ovseg cannot tell which pretrained weights this file holds, and the pretrained "
        f"tags of '{arch}' disagree on the activation (QuickGELU: {some(quick)}; GELU: {some(gelu)}); the wrong "
        f"one changes every output. Say which tag the file holds: for QuickGELU{eg(qt)} {load_call(arch, qt, value)}; "
        f"for GELU{eg(gt)} {load_call(arch, gt, value)}."
    )


def resolve_file_activation(
    arch: str,
    file: Path,
    keys: Sequence[str],
    *,
    tag: Optional[str] = None,
    torchscript: bool = False,
) -> Tuple[bool, Optional[str], str]:
    """Decide the activation of a local CLIP checkpoint (module docstring, rules 1-4).

    Args:
        arch: open_clip architecture name.
        file: the checkpoint file (its path is evidence: Hugging Face cache, hub folder).
        keys: the checkpoint's keys (OpenAI's extra entries are evidence).
        tag: the user's ``clip_tag`` (already validated against ``arch``'s tags), or None.
        torchscript: whether the file is a TorchScript archive.

    Returns:
        (quick_gelu, the pretrained tag the file holds or None, the reason, for the log).

    Raises:
        InvalidInputError: the evidence contradicts ``clip_tag`` or a ``-quickgelu`` name, or the file cannot be
            identified while ``arch``'s tags disagree on the activation.
    """
    import open_clip

    found = _recognise(arch, file, keys, torchscript)
    acts = {r.quick_gelu for r in found}
    if len(acts) > 1:
        raise InvalidInputError(f"clip_weights '{file}': contradictory evidence about its activation: " + "; ".join(
            f"{r.reason} ({_NAMES[r.quick_gelu]})" for r in found) + ". Pass a file that open_clip's table "
            "describes, or move it out of that folder and name its tag with clip_tag=")
    rec = next((r for r in found if r.names_repo), found[0] if found else None)
    arch_qg = bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))
    if tag is not None:
        qg = arch_qg or _tag_quick_gelu(arch, tag)
        if rec is not None and (rec.quick_gelu != qg or (rec.names_repo and rec.tag != tag)):
            raise InvalidInputError(
                f"clip_tag '{tag}' ({_NAMES[qg]}) contradicts clip_weights '{file}': {rec.reason} "
                f"({_NAMES[rec.quick_gelu]}). Correct clip_tag" + (f" (clip_tag='{rec.tag}')" if rec.tag else ""))
        return qg, tag, f"clip_tag '{tag}'"
    if rec is not None:
        if arch_qg and not rec.quick_gelu:
            raise InvalidInputError(
                f"clip_weights '{file}' holds GELU-trained weights ({rec.reason}) but the architecture '{arch}' "
                f"forces QuickGELU; use clip='{arch[: -len('-quickgelu')]}'")
        return rec.quick_gelu, rec.tag, rec.reason
    if arch_qg:
        return True, None, f"the architecture name '{arch}'"
    tags = open_clip.list_pretrained_tags_by_model(arch)
    quick = [t for t in tags if _tag_quick_gelu(arch, t)]
    gelu = [t for t in tags if t not in quick]
    if quick and gelu:
        raise _ambiguous(arch, str(file), quick, gelu)
    if tags:
        return bool(quick), None, f"all pretrained tags of '{arch}' use {_NAMES[bool(quick)]}"
    return False, None, f"the architecture config of '{arch}'"
