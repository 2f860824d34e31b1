"""Which precision to run in: ``"auto"`` picks fp16 on CUDA, bf16 on CPUs with native bf16 arithmetic, else fp32.

Reduced precision on a CPU is only faster with hardware support: without AVX512-BF16 or AMX (x86) or the BF16
extension (ARM), torch emulates bf16 matmuls and they run several times *slower* than fp32 (measured: ProxyCLIP
6.3x slower on an AVX2-only EPYC, 2.25x faster on an AMX Xeon). The CPU features come from
``torch.cpu.get_capabilities()`` (torch >= 2.8; cpuinfo's flags) or, on older torch, from
``torch.cpu._is_avx512_bf16_supported()`` / ``_is_amx_tile_supported()``.
"""
from __future__ import annotations

import logging
import os
import platform
from typing import Dict, Optional, Union

import torch

from .errors import InvalidInputError

logger = logging.getLogger(__name__)

__all__ = ["PRECISION_CHOICES", "cpu_features", "cpu_has_native", "cpu_capability_line", "resolve_precision"]

PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16")

_WARNED: set = set()


def cpu_features() -> Dict[str, bool]:
    """Native reduced-precision features of this CPU: ``{"bf16": ..., "fp16": ..., "amx": ..., "avx512_bf16": ...}``.

    bf16 is native with AVX512-BF16 or AMX-BF16 (x86) or the BF16 extension (ARM: ``bf16`` / ``sve_bf16``); fp16 with
    AVX512-FP16 or AMX-FP16 (x86) or FP16 arithmetic (ARM ``fp16_arith``).
    """
    caps = {}
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        try:
            caps = dict(get())
        except Exception:  # pragma: no cover - cpuinfo could not initialise
            caps = {}
    if not caps:  # older torch: the private checks that exist since 2.3
        for key, fn in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_tile", "_is_amx_tile_supported"),
                        ("amx_fp16", "_is_amx_fp16_supported")):
            f = getattr(torch.cpu, fn, None)
            try:
                caps[key] = bool(f()) if f is not None else False
            except Exception:  # pragma: no cover
                caps[key] = False
        caps["amx_bf16"] = caps.get("amx_tile", False)  # AMX-BF16 shipped with the first AMX tiles
    has = lambda k: bool(caps.get(k, False))  # noqa: E731
    amx = has("amx_bf16") or has("amx_tile")
    return {
        "bf16": has("avx512_bf16") or has("amx_bf16") or has("bf16") or has("sve_bf16"),
        "fp16": has("avx512_fp16") or has("amx_fp16") or has("fp16_arith"),
        "amx": amx,
        "avx512_bf16": has("avx512_bf16"),
    }


def cpu_has_native(precision: str) -> bool:
    """True when this CPU computes ``precision`` ("bf16" or "fp16") in hardware; always True for "fp32"."""
    if precision == "fp32":
        return True
    return cpu_features().get(precision, False)


def cpu_capability_line() -> str:
    """One line for ``ovseg doctor`` and the benchmarks, e.g.
    ``CPU: AMD EPYC | torch kernels: AVX2 | native bf16: no | native fp16: no | precision "auto" on CPU: fp32``."""
    feats = cpu_features()
    name = ""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        try:
            name = str(get().get("cpu_name", ""))
        except Exception:  # pragma: no cover
            name = ""
    name = name or platform.processor() or platform.machine()
    kernels = torch.backends.cpu.get_cpu_capability()
    bf16 = "yes" + (" (AMX)" if feats["amx"] else " (AVX512-BF16)" if feats["avx512_bf16"] else "") \
        if feats["bf16"] else "no"
    return (f"CPU: {name} | torch kernels: {kernels} | native bf16: {bf16} | "
            f"native fp16: {'yes' if feats['fp16'] else 'no'} | precision \"auto\" on CPU: "
            f"{resolve_precision('auto', 'cpu')}")


def resolve_precision(precision: Optional[str], device: Union[str, torch.device]) -> str:
    """``"auto"`` (or None) -> the precision to run on ``device``; an explicit one is checked and returned.

    ``auto``: ``"fp16"`` on CUDA (as the papers ran), ``"bf16"`` on a CPU with native bf16 (AMX / AVX512-BF16 / ARM
    BF16), ``"fp32"`` otherwise (CPUs without it, MPS and other devices). The environment variable
    ``OVSEG_PRECISION`` (``fp32``, ``fp16`` or ``bf16``) pins what ``auto`` means, e.g. ``OVSEG_PRECISION=fp32`` for
    bit-reproducible runs on every CPU (the test suite sets it). An explicit ``"bf16"``/``"fp16"`` on a CPU
    without native support is honoured, with a warning (once per process) that it is emulated and slower than fp32.

    Returns:
        ``"fp32"``, ``"fp16"`` or ``"bf16"``.
    """
    if precision is None:
        precision = "auto"
    if precision not in PRECISION_CHOICES:
        raise InvalidInputError(f"precision must be one of {PRECISION_CHOICES}, got {precision!r}")
    dev = torch.device(device)
    if precision == "auto":
        pinned = os.environ.get("OVSEG_PRECISION", "").strip()
        if pinned:
            if pinned not in PRECISION_CHOICES[1:]:
                raise InvalidInputError(f"OVSEG_PRECISION must be one of {PRECISION_CHOICES[1:]}, got {pinned!r}")
            return resolve_precision(pinned, dev)
        if dev.type == "cuda":
            return "fp16"
        if dev.type == "cpu" and cpu_has_native("bf16"):
            return "bf16"
        return "fp32"
    if dev.type == "cpu" and precision != "fp32" and not cpu_has_native(precision) and precision not in _WARNED:
        _WARNED.add(precision)
        logger.warning(
            "precision=%r on a CPU without native %s arithmetic (torch kernels: %s): torch emulates it, which is "
            "several times slower than fp32 here. Use precision='auto' or 'fp32'.",
            precision, precision, torch.backends.cpu.get_cpu_capability())
    return precision
