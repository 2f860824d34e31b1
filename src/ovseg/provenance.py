"""What shaped a result: every setting of a :class:`~ovseg.Segmenter` as a JSON-able dict, and a stable key of
the settings that change predictions (used by ``ovseg eval --resume`` and ``ovseg predict``'s resume)."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

__all__ = ["settings_of", "prediction_key", "settings_diff", "param_digest", "EXECUTION_ONLY"]

# Settings that change how a prediction is computed but not what the method computes (only floating-point
# rounding): they are recorded, but two runs that differ only in them share stored predictions.
EXECUTION_ONLY = ("device", "batch_size", "memory_budget", "compile")


def _jsonable(value: Any) -> Any:
    """Tuples -> lists, numpy/torch scalars -> Python numbers, anything else unknown -> its str."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return str(value)


def param_digest(module: Optional[torch.nn.Module], samples: int = 64) -> Optional[str]:
    """A short fingerprint of a module's weights: SHA-256 over every parameter's and buffer's name, shape and
    ``samples`` evenly strided values (float32 bytes). Different checkpoints (or random seeds, or architecture
    overrides) give different digests; computing it reads a few thousand numbers, not the whole model."""
    if module is None:
        return None
    h = hashlib.sha256()
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    for name, t in sorted(tensors, key=lambda nt: nt[0]):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(flat[::step][:samples].float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def settings_of(seg, *, vfm_weights: Optional[str] = None) -> Dict[str, Any]:
    """Everything that shaped a :class:`~ovseg.Segmenter`'s predictions, JSON-able.

    Keys: ``ovseg`` (version), ``method``, ``options`` (the method config: window, stride, short_side,
    pad_multiple, threshold, logit_scale, PAMR, templates, the strategy and every strategy option resolved, ...),
    ``templates`` (the resolved prompt strings), ``clip`` (architecture, weights, activation, identity, digest),
    ``vfm`` (the ``"vfm"`` role: name, weights, digest; None without one), ``vfms`` (every role),
    ``precision``, ``device``, ``batch_size``, ``memory_budget``.

    Args:
        seg: the segmenter.
        vfm_weights: what was passed as ``vfm_weights`` (the Segmenter does not keep it); None = the official
            release. The ``digest`` identifies the weights either way.
    """
    s = seg.settings()
    options = {k: v for k, v in s["method"].items() if k != "name"}
    clip = seg.clip
    vfms = {}
    for role, vfm in seg.model.vfms.items():
        given = vfm_weights.get(role) if isinstance(vfm_weights, dict) else (vfm_weights if role == "vfm" else None)
        vfms[role] = {"name": s["vfms"][role]["name"],
                      "weights": _jsonable(getattr(vfm, "weights", None) or given or "official"),
                      "identity": _jsonable(getattr(vfm, "identity", None)), "digest": param_digest(vfm)}
    return {
        "ovseg": s["ovseg"],
        "method": s["method"]["name"],
        "options": _jsonable(options),
        "templates": list(s["templates"]),
        "clip": {
            "arch": s["clip"],
            "weights": _jsonable(s["clip_weights"]),
            "activation": _jsonable(s["clip_activation"]),
            "identity": _jsonable(s["clip_identity"]),
            "digest": param_digest(getattr(clip, "model", clip)),
        },
        "vfm": vfms.get("vfm"),
        "vfms": vfms,
        "precision": s["precision"],
        "device": s["device"],
        "batch_size": s["method"]["batch_size"],
        "memory_budget": getattr(seg, "memory_budget", None),
    }


def _strip_execution(settings: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: v for k, v in settings.items() if k not in EXECUTION_ONLY}
    if isinstance(out.get("options"), dict):
        out["options"] = {k: v for k, v in out["options"].items() if k not in EXECUTION_ONLY}
    return out


def prediction_key(settings: Dict[str, Any], **context: Any) -> Tuple[str, Dict[str, Any]]:
    """(12-hex-digit key, the keyed dict) for stored predictions: ``settings`` (from :func:`settings_of`) less
    :data:`EXECUTION_ONLY`, plus ``context`` (e.g. the dataset and its class names). Same key = same method,
    options, weights, precision, ovseg version and context."""
    keyed = _jsonable({"settings": _strip_execution(settings), **context})
    blob = json.dumps(keyed, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12], keyed


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def settings_diff(old: Dict[str, Any], new: Dict[str, Any], limit: int = 6) -> Iterable[str]:
    """Human-readable differences between two keyed dicts: ``"settings.options.window: [336, 336] -> [224, 224]"``."""
    a, b = _flatten(old), _flatten(new)
    diffs = [f"{k}: {_short(a.get(k))} -> {_short(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return diffs[:limit] + ([f"... and {len(diffs) - limit} more"] if len(diffs) > limit else [])


def _short(v: Any) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 60 else s[:57] + "..."
