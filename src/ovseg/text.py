"""Text side: label parsing with synonyms, prompt templates, and the cached zero-shot text classifier.

Procedure of both references (docs/methods.md, "Text classifier"; open_clip's ``build_zero_shot_classifier``):
each query is written into every template, each prompt embedding is L2-normalised, the mean over templates is
L2-normalised again. Synonyms are separate queries whose probabilities are max-pooled per class.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .errors import InvalidInputError

logger = logging.getLogger(__name__)

__all__ = ["LabelSet", "parse_labels", "get_templates", "check_templates", "normalize_templates", "TextClassifier",
           "TEMPLATE_SETS"]

LabelsLike = Union[str, Sequence[Union[str, Sequence[str]]]]


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


def _clean(label: object, where: str) -> str:
    if not isinstance(label, str):
        raise TypeError(f"labels must be strings, got {type(label).__name__} {label!r} {where}")
    text = " ".join(label.split())
    if not text:
        raise ValueError(f"empty or whitespace-only label {label!r} {where}; every label needs a word")
    return text


def parse_labels(labels: LabelsLike, *, synonym_sep: str = ";") -> LabelSet:
    """Parse user labels.

    Accepts a list whose items are a string (``"sofa; couch"`` gives synonyms) or a list of synonym strings.
    The first synonym names the class. Empty lists, empty/whitespace labels, non-strings and duplicate
    class names (case-insensitive) are rejected.
    """
    if isinstance(labels, str):
        raise TypeError(
            f"labels must be a list of strings, got the single string {labels!r}; "
            f"write [{labels!r}] or split it yourself"
        )
    if isinstance(labels, LabelSet):
        return labels
    try:
        items = list(labels)
    except TypeError:
        raise TypeError(f"labels must be a list of strings, got {type(labels).__name__}") from None
    if not items:
        raise ValueError("labels is empty; give at least one label, e.g. ['cat', 'sofa; couch']")
    names: List[str] = []
    queries: List[str] = []
    query_class: List[int] = []
    seen = {}
    for c, item in enumerate(items):
        where = f"(labels[{c}] = {item!r})"
        if isinstance(item, str):
            syns = [_clean(s, where) for s in item.split(synonym_sep)] if synonym_sep in item else [_clean(item, where)]
        elif isinstance(item, (list, tuple)):
            if not item:
                raise ValueError(f"empty synonym list {where}")
            syns = [_clean(s, where) for s in item]
        else:
            raise TypeError(f"labels must be strings or lists of strings, got {type(item).__name__} {item!r} {where}")
        key = syns[0].lower()
        if key in seen:
            raise ValueError(f"duplicate label {syns[0]!r} (labels[{seen[key]}] and labels[{c}]); "
                             "labels must be unique")
        seen[key] = c
        names.append(syns[0])
        for s in dict.fromkeys(syns):  # drop repeated synonyms within a class, keep order
            queries.append(s)
            query_class.append(c)
    return LabelSet(tuple(names), tuple(queries), tuple(query_class))


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
    """Query embeddings (Q, E), unit-norm float32, cached per (model, queries, templates) in a bounded LRU."""

    def __init__(self, clip, *, batch_size: int = 256, cache_size: int = 32):
        self.clip = clip
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self.hits = 0
        self.misses = 0

    def cache_info(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._cache), "max_size": self.cache_size}

    def clear_cache(self) -> None:
        self._cache.clear()

    @torch.inference_mode()
    def __call__(self, queries: Sequence[str], templates: Sequence[str], device=None) -> torch.Tensor:
        templates = tuple(templates)
        key = (tuple(queries), templates)  # one classifier per CLIP model
        if key in self._cache:
            self.hits += 1
            self._cache.move_to_end(key)
            emb = self._cache[key]
        else:
            self.misses += 1
            emb = self._encode(queries, templates)
            self._cache[key] = emb
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return emb if device is None else emb.to(device)

    def _encode(self, queries: Sequence[str], templates: Tuple[str, ...]) -> torch.Tensor:
        prompts = [t.replace("{}", q) for q in queries for t in templates]
        device = next(self.clip.parameters()).device
        chunks = []
        for i in range(0, len(prompts), self.batch_size):
            tokens = self.clip.tokenize(prompts[i:i + self.batch_size]).to(device)
            chunks.append(F.normalize(self.clip.encode_text(tokens).float(), dim=-1))
        emb = torch.cat(chunks).view(len(queries), len(templates), -1).mean(dim=1)
        logger.info("encoded %d queries x %d templates", len(queries), len(templates))
        return F.normalize(emb, dim=-1)
