"""Text side: label parsing with synonyms, prompt templates, and the cached zero-shot text classifier.

Procedure of both references (docs/methods.md, "Text classifier"; open_clip's ``build_zero_shot_classifier``):
each query is written into every template, each prompt embedding is L2-normalised, the mean over templates is
L2-normalised again. Synonyms are separate queries whose probabilities are max-pooled per class.
"""
from __future__ import annotations

import codecs
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .errors import InvalidInputError, InvalidTypeError, PathNotFoundError

if TYPE_CHECKING:  # pragma: no cover
    from .cache import TextEmbeddingCache

logger = logging.getLogger(__name__)

__all__ = ["LabelSet", "parse_labels", "read_label_file", "read_text_lines", "get_templates", "check_templates",
           "normalize_templates", "TextClassifier", "TEMPLATE_SETS"]

LabelsLike = Union[Sequence[Union[str, Sequence[str]]], Mapping[str, Union[str, Sequence[str]]]]


@dataclass(frozen=True)
class LabelSet:
    """Parsed labels: ``names[c]`` names class c; ``queries[q]`` is a text query of class ``query_class[q]``."""

    names: Tuple[str, ...]
    queries: Tuple[str, ...]
    query_class: Tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def has_synonyms(self) -> bool:
        return len(self.queries) != len(self.names)

    def synonyms(self) -> Dict[str, List[str]]:
        """Class name -> its text queries (the name first), in class order."""
        out: Dict[str, List[str]] = {n: [] for n in self.names}
        for q, c in zip(self.queries, self.query_class):
            out[self.names[c]].append(q)
        return out


def _clean(label: object, where: str) -> str:
    if not isinstance(label, str):
        raise InvalidTypeError(f"labels must be strings, got {type(label).__name__} {label!r} {where}")
    text = " ".join(label.split())
    if not text:
        raise InvalidInputError(f"empty or whitespace-only label {label!r} {where}; every label needs a word")
    return text


def _synonyms(item: object, where: str, synonym_sep: str) -> List[str]:
    """One class's queries from ``"sofa; couch"`` or ``["sofa", "couch"]``."""
    if isinstance(item, str):
        return [_clean(s, where) for s in item.split(synonym_sep)] if synonym_sep in item else [_clean(item, where)]
    if isinstance(item, (set, frozenset)):
        raise InvalidTypeError(f"synonyms must be a list, not a set {where}: a set's order changes between runs and "
                               "the first synonym names the class")
    if isinstance(item, (list, tuple)):
        if not item:
            raise InvalidInputError(f"empty synonym list {where}")
        return [_clean(s, where) for s in item]
    raise InvalidTypeError(f"labels must be strings or lists of strings, got {type(item).__name__} {item!r} {where}")


def _items_from_mapping(labels: Mapping, synonym_sep: str) -> List[List[str]]:
    """``{"sofa": ["couch", "settee"], "cat": "kitten"}``: key = class name (and first query), value = more synonyms."""
    items = []
    for name, value in labels.items():
        where = f"(labels[{name!r}])"
        if not isinstance(name, str) or synonym_sep in name:
            raise InvalidTypeError(f"label dict keys must be single class names (strings without "
                                   f"'{synonym_sep}'), got {name!r}")
        if value is None or (isinstance(value, (list, tuple)) and not value):
            extra: List[str] = []
        else:
            extra = _synonyms(value, where, synonym_sep)
        items.append([name, *extra])
    return items


def parse_labels(labels: LabelsLike, *, synonym_sep: str = ";") -> LabelSet:
    """Parse user labels.

    Accepts a list whose items are a string (``"sofa; couch"`` gives synonyms) or a list of synonym strings
    (the first synonym names the class), or a dict ``{class name: synonyms}`` whose value is a string
    (``";"``-separated synonyms), a list of strings, or ``[]``/``None`` for none; the name itself is the
    class's first query. Sets are refused (their order, and so the label indices, changes between runs), as are
    empty lists, empty/whitespace labels, non-strings and duplicate class names (case-insensitive).
    """
    if isinstance(labels, str):
        raise InvalidTypeError(
            f"labels must be a list of strings, got the single string {labels!r}; "
            f"write [{labels!r}] or split it yourself"
        )
    if isinstance(labels, LabelSet):
        return labels
    if isinstance(labels, (set, frozenset)):
        raise InvalidTypeError(
            f"labels must be a list, not a {type(labels).__name__}: a set's order changes between runs, and with it "
            f"the index of every label in the label map; pass a list, e.g. sorted(labels) = {sorted(map(str, labels))}"
        )
    if isinstance(labels, Mapping):
        items: List[object] = list(_items_from_mapping(labels, synonym_sep))
    else:
        try:
            items = list(labels)
        except TypeError:
            raise InvalidTypeError(f"labels must be a list of strings, got {type(labels).__name__}") from None
    if not items:
        raise InvalidInputError("labels is empty; give at least one label, e.g. ['cat', 'sofa; couch']")
    names: List[str] = []
    queries: List[str] = []
    query_class: List[int] = []
    seen: Dict[str, int] = {}
    for c, item in enumerate(items):
        syns = _synonyms(item, f"(labels[{c}] = {item!r})", synonym_sep)
        key = syns[0].lower()
        if key in seen:
            raise InvalidInputError(f"duplicate label {syns[0]!r} (labels[{seen[key]}] and labels[{c}]); "
                                    "labels must be unique")
        seen[key] = c
        names.append(syns[0])
        for s in dict.fromkeys(syns):  # drop repeated synonyms within a class, keep order
            queries.append(s)
            query_class.append(c)
    return LabelSet(tuple(names), tuple(queries), tuple(query_class))


def read_text_lines(path: Union[str, "os.PathLike[str]"], *, option: str = "labels file") -> List[Tuple[int, str]]:
    """(line number, text) of the non-blank, non-comment lines of a UTF-8 text file.

    A UTF-8 byte-order mark is removed; UTF-16 files with a byte-order mark are decoded as UTF-16; any other
    bytes that are not UTF-8 are an error naming the file, the line and the byte (nothing is guessed). A ``#``
    at the start of a line or after a space starts a comment (``C#`` stays a label).
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise PathNotFoundError(f"{option}: file not found: '{path}'")
    data = p.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data, encoding = data[len(codecs.BOM_UTF8):], "utf-8"
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    else:
        encoding = "utf-8"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InvalidInputError(
            f"{option} '{path}' is not {encoding.upper()} text: line {line} has the byte 0x{data[e.start]:02x} "
            "(another encoding, e.g. Latin-1 or Windows-1252?); save the file as UTF-8"
        ) from None
    out = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = _COMMENT.sub("", raw).strip()
        if line:
            out.append((n, line))
    return out


_COMMENT = re.compile(r"(^|\s)#.*$")


def read_label_file(path: Union[str, "os.PathLike[str]"], *, option: str = "labels file") -> List[str]:
    """Labels from a text file: one class per line, ``;`` between synonyms, ``#`` comments and blank lines
    skipped (encoding rules of :func:`read_text_lines`). Errors name the file."""
    labels = [line for _, line in read_text_lines(path, option=option)]
    if not labels:
        raise InvalidInputError(f"{option} '{path}' has no labels (only blank or # comment lines)")
    return labels


def normalize_templates(templates: Sequence[Union[str, Callable[[str], str]]]) -> Tuple[str, ...]:
    """Templates as strings with one ``{}`` placeholder (callables such as open_clip's lambdas are evaluated)."""
    if isinstance(templates, str):
        templates = [templates]
    out = []
    for t in templates:
        s = t("{}") if callable(t) else t
        if not isinstance(s, str) or "{}" not in s:
            raise InvalidInputError(f"template {t!r} must be a string containing '{{}}' for the label")
        out.append(s)
    if not out:
        raise InvalidInputError("templates is empty")
    return tuple(out)


TEMPLATE_SETS = ("openai_imagenet", "simple_imagenet", "single", "identity")


def check_templates(name: Union[str, Sequence]) -> Union[str, Tuple[str, ...]]:
    """Validate a template choice without building it (no open_clip import): a known set name, one string with
    ``{}``, or a sequence of such strings."""
    if isinstance(name, str):
        if name not in TEMPLATE_SETS and "{}" not in name:
            raise InvalidInputError(f"unknown template set {name!r}; choose one of {list(TEMPLATE_SETS)} "
                                    "or pass a list of strings containing '{}'")
        return name
    return normalize_templates(name)


def get_templates(name: Union[str, Sequence] = "openai_imagenet") -> Tuple[str, ...]:
    """Named template sets: ``openai_imagenet`` (80, the references' default), ``simple_imagenet`` (7,
    open_clip's short set), ``single`` ("a photo of a {}."), ``identity`` ("{}"). A sequence is used as given."""
    name = check_templates(name)
    if not isinstance(name, str):
        return name
    if name not in TEMPLATE_SETS:
        return normalize_templates([name])
    if name in ("single", "identity"):
        return normalize_templates({"single": ("a photo of a {}.",), "identity": ("{}",)}[name])
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    return normalize_templates({"openai_imagenet": OPENAI_IMAGENET_TEMPLATES,
                                "simple_imagenet": SIMPLE_IMAGENET_TEMPLATES}[name])


class TextClassifier:
    """Query embeddings (Q, E), unit-norm float32, from three layers: an in-memory LRU per query, the persistent
    disk cache (:mod:`ovseg.cache`), and the CLIP text tower for the queries still missing — adding one label to a
    list encodes that label only.

    Args:
        clip: the CLIP adapter (``tokenize``, ``encode_text``, ``model``).
        batch_size: prompts per text-tower call (whole queries: ``batch_size // len(templates)`` queries at a time,
            whose prompts share the template prefixes).
        cache_size: query embeddings kept in memory (per template set).
        disk_cache: ``None`` follows ``OVSEG_TEXT_CACHE`` (on by default, under ``$OVSEG_HOME``); ``False`` turns it
            off; a :class:`ovseg.cache.TextEmbeddingCache` uses that one.
        progress: a progress bar when more than 256 prompts are encoded.
    """

    def __init__(self, clip, *, batch_size: int = 1024, cache_size: int = 4096,
                 disk_cache: Union[bool, None, "TextEmbeddingCache"] = None, progress: bool = False):
        self.clip = clip
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.disk_cache = disk_cache
        self.progress = progress
        self._cache: "OrderedDict[Tuple[Tuple[str, ...], str], torch.Tensor]" = OrderedDict()
        self._model_key: Optional[dict] = None
        self._model_key_done = False
        self.hits = 0  # calls answered from memory alone
        self.misses = 0  # calls that needed the disk cache or the text tower
        self.disk_hits = 0  # queries read from the disk cache
        self.encoded = 0  # queries encoded by the text tower

    def cache_info(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._cache), "max_size": self.cache_size,
                "disk_hits": self.disk_hits, "encoded": self.encoded}

    def clear_cache(self) -> None:
        """Forget the in-memory embeddings (the disk cache is kept: ``ovseg cache clear`` empties it)."""
        self._cache.clear()

    def _remember(self, templates: Tuple[str, ...], query: str, emb: torch.Tensor) -> None:
        self._cache[(templates, query)] = emb
        self._cache.move_to_end((templates, query))
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _disk(self):
        """(cache, model key) when the disk cache is usable for this model, else (None, None)."""
        from .cache import TextEmbeddingCache, clip_text_identity, text_cache_enabled

        if self.disk_cache is False or (self.disk_cache is None and not text_cache_enabled()):
            return None, None
        cache = self.disk_cache if isinstance(self.disk_cache, TextEmbeddingCache) else TextEmbeddingCache()
        if not self._model_key_done:
            self._model_key_done = True
            try:
                self._model_key = clip_text_identity(self.clip)
            except Exception as e:  # an unreadable weights file, an unusual adapter: run without the disk cache
                logger.warning("text-embedding disk cache off for this model: %s: %s", type(e).__name__, e)
                self._model_key = None
        return (cache, self._model_key) if self._model_key is not None else (None, None)

    def prime(self, queries: Sequence[str], templates: Sequence[str], embeddings: torch.Tensor) -> None:
        """Put embeddings computed elsewhere (e.g. broadcast by rank 0 under torchrun) into the in-memory cache.

        Args:
            queries: Q query strings.
            templates: the template set they were computed with.
            embeddings: (Q, E) unit-norm rows, as returned by calling a classifier of the same CLIP model.
        """
        templates = tuple(templates)
        if embeddings.dim() != 2 or embeddings.shape[0] != len(queries):
            raise InvalidInputError(f"embeddings must be (Q={len(queries)}, E), got {tuple(embeddings.shape)}")
        emb = embeddings.detach().float().cpu()
        for q, e in zip(queries, emb):
            self._remember(templates, q, e.clone())

    @torch.inference_mode()
    def __call__(self, queries: Sequence[str], templates: Sequence[str], device=None, *,
                 progress: Optional[bool] = None) -> torch.Tensor:
        """(Q, E) unit-norm float32 embeddings of ``queries`` (on ``device``, default CPU)."""
        templates = tuple(templates)
        found: Dict[str, torch.Tensor] = {}
        for q in dict.fromkeys(queries):
            e = self._cache.get((templates, q))
            if e is not None:
                self._cache.move_to_end((templates, q))
                found[q] = e
        missing = [q for q in dict.fromkeys(queries) if q not in found]
        if not missing:
            self.hits += 1
        else:
            self.misses += 1
            cache, key = self._disk()
            if cache is not None:
                got = cache.get_many(key, templates, missing)
                self.disk_hits += len(got)
                found.update(got)
            todo = [q for q in missing if q not in found]
            if todo:
                new = self._encode(todo, templates, self.progress if progress is None else progress)
                self.encoded += len(todo)
                found.update(new)
                if cache is not None:
                    cache.put_many(key, templates, new)
            for q in missing:
                self._remember(templates, q, found[q])
        emb = torch.stack([found[q] for q in queries])  # (Q, E)
        return emb if device is None else emb.to(device)

    def _encode(self, queries: Sequence[str], templates: Tuple[str, ...], progress: bool) -> Dict[str, torch.Tensor]:
        """{query: (E,) float32 CPU}: each query written into every template, each prompt embedding L2-normalised,
        the mean over templates L2-normalised again."""
        device = next(self.clip.parameters()).device
        per_batch = max(1, self.batch_size // len(templates))  # whole queries per text-tower call
        bar = None
        if progress and len(queries) * len(templates) > 256:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(queries) * len(templates), desc="text prompts", unit="prompt")
        out = {}
        try:
            for i in range(0, len(queries), per_batch):
                chunk = queries[i:i + per_batch]
                tokens = self.clip.tokenize([t.replace("{}", q) for q in chunk for t in templates]).to(device)
                emb = F.normalize(self.clip.encode_text(tokens).float(), dim=-1)  # (q·T, E)
                emb = F.normalize(emb.view(len(chunk), len(templates), -1).mean(dim=1), dim=-1).cpu()  # (q, E)
                out.update(zip(chunk, emb))
                if bar is not None:
                    bar.update(len(chunk) * len(templates))
        finally:
            if bar is not None:
                bar.close()
        logger.info("encoded %d queries x %d templates", len(queries), len(templates))
        return out
