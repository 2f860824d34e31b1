"""Attention strategies for CLIP's last block: stateless tensor functions plus what each one needs.

Every strategy is called as ``fn(q, k, v, *, scale, grid, **params)`` on per-head tensors
(B, nh, L, hd) with the CLS token at index 0 (q or k may be None when the strategy does not use them),
and returns (B, nh, L_out, hd). ``keeps_cls`` tells whether the output still starts with CLS;
``uses_vfm`` whether it needs ``vfm_feats`` (B, C, I, J), in which case the output grid is (I, J).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

from .._registry import Registry
from ..errors import InvalidInputError, InvalidTypeError
from ..params import Param, boolean, positive
from .gaussian import gaussian_kk_attention, gaussian_kk_weights, gaussian_window
from .proxy import proxy_attention, proxy_weights, resize_values
from .self_self import kk_attention, qq_attention, qq_kk_attention, qq_kk_weights, self_weights
from .vanilla import maskclip_attention, maskclip_weights, vanilla_attention, vanilla_weights

__all__ = [
    "AttentionStrategy", "ATTENTIONS", "get_attention", "list_attentions", "register_attention",
    "vanilla_attention", "vanilla_weights", "maskclip_attention", "maskclip_weights",
    "qq_attention", "kk_attention", "qq_kk_attention", "qq_kk_weights", "self_weights",
    "gaussian_kk_attention", "gaussian_kk_weights", "gaussian_window",
    "proxy_attention", "proxy_weights", "resize_values",
]


@dataclass(frozen=True)
class AttentionStrategy:
    """A last-block attention: the function, which projections it reads, and its declared parameters.

    Attributes:
        name: registry name (``Segmenter(..., attention=name)``).
        fn: ``fn(q, k, v, *, scale, grid, vfm_feats, **params) -> (B, nh, L_out, hd)``.
        needs: subset of ``{"q", "k", "v"}`` (must include ``"v"``); the adapter computes only these projections
            and passes None for the others.
        keeps_cls: whether the output still starts with CLS (False: it changes the token grid, e.g. ``proxy``).
        uses_vfm: whether it needs VFM features (B, C, I, J); the output grid is then (I, J).
        params: its options with defaults (:class:`ovseg.params.Param`); method presets override them.
        row_sum: what each row of its attention weights sums to (1 for a softmax, 2 for SCLIP's sum, None if
            it has no weights); checked by the contract test over every registered strategy.
        doc: one line for listings.
    """

    name: str
    fn: Callable
    needs: FrozenSet[str]
    keeps_cls: bool = True
    uses_vfm: bool = False
    params: Tuple[Param, ...] = ()
    row_sum: Optional[float] = 1.0
    doc: str = ""


ATTENTIONS = Registry("attention", "list_attentions")


def register_attention(strategy: AttentionStrategy, *, overwrite: bool = False) -> AttentionStrategy:
    """Add a strategy so that ``Segmenter(..., attention=name)`` can use it."""
    if not isinstance(strategy, AttentionStrategy):
        raise InvalidTypeError(f"expected an AttentionStrategy, got {type(strategy).__name__}")
    if not strategy.needs <= {"q", "k", "v"} or "v" not in strategy.needs:
        raise InvalidInputError(f"strategy '{strategy.name}' needs {set(strategy.needs)}; "
                                "must include 'v' and only q/k/v")
    bad = [p for p in strategy.params if not isinstance(p, Param)]
    if bad:
        raise InvalidTypeError(f"strategy '{strategy.name}': params must be ovseg.params.Param objects "
                               f"(name, default, doc, check), got {bad!r}")
    ATTENTIONS.register(strategy.name, strategy, doc=strategy.doc, overwrite=overwrite)
    return strategy


def get_attention(name: str) -> AttentionStrategy:
    return ATTENTIONS.get(name).obj


def list_attentions() -> List[str]:
    """Names of the registered attention strategies."""
    return ATTENTIONS.names()


def describe_attentions() -> Dict[str, str]:
    return ATTENTIONS.describe()


for _s in (
    AttentionStrategy("vanilla", vanilla_attention, frozenset("qkv"), doc="CLIP's q-k attention"),
    AttentionStrategy("maskclip", maskclip_attention, frozenset("v"),
                      doc="MaskCLIP: values only (identity attention)"),
    AttentionStrategy("qq", qq_attention, frozenset("qv"), doc="ClearCLIP: q-q self-attention"),
    AttentionStrategy("kk", kk_attention, frozenset("kv"), doc="k-k self-attention"),
    AttentionStrategy("qq_kk", qq_kk_attention, frozenset("qkv"), row_sum=2.0,
                      doc="SCLIP: softmax(qq)+softmax(kk), rows sum to 2"),
    AttentionStrategy("gaussian_kk", gaussian_kk_attention, frozenset("kv"),
                      params=(Param("sigma", 5.0, "std of the Gaussian window, in patches", positive),),
                      doc="NACLIP: k-k plus an unnormalised Gaussian window (Eq. 15)"),
    AttentionStrategy("proxy", proxy_attention, frozenset("v"), keeps_cls=False, uses_vfm=True,
                      params=(Param("beta", 1.2, "shift: similarities below beta x mean are masked", positive),
                              Param("gamma", 3.0, "scale of the shifted similarities", positive),
                              Param("keep_diagonal", True, "never mask a token's similarity with itself "
                                    "(False: the reference's NaN rows)", boolean)),
                      doc="ProxyCLIP: VFM cosine similarity, shifted, scaled and masked (Eqs. 6-8)"),
):
    register_attention(_s)
