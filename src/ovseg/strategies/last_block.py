"""The seed methods' strategy: CLIP's trunk unchanged, the last block's attention swapped for a registered
attention function, its residual and FFN kept or dropped (docs/methods.md, "CLIP's vision tower")."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..attention import ATTENTIONS, get_attention
from ..errors import InvalidInputError
from ..params import Param, boolean
from .base import DenseStrategy, WindowContext, register_strategy

__all__ = ["LastBlock"]


def _attention_name(name: str, value: Any) -> str:
    get_attention(value)  # unknown names raise with a did-you-mean suggestion
    return value


@register_strategy
class LastBlock(DenseStrategy):
    """Blocks 1..L−1 of CLIP, then the last block with ``attention`` (and optionally its residual and FFN)."""

    name = "last_block"
    doc = "CLIP's last block with a registered attention (clip, maskclip, sclip, clearclip, naclip, proxyclip)"
    base_params: Tuple[Param, ...] = (
        Param("attention", "vanilla", "last-block attention, one of ovseg.list_attentions()", _attention_name),
        Param("residual", True, "keep the residual around the last attention", boolean),
        Param("ffn", True, "keep the last block's FFN (and its residual)", boolean),
    )

    @classmethod
    def declared_params(cls, options: Mapping[str, Any]) -> Tuple[Param, ...]:
        name = options.get("attention", "vanilla")
        extra = get_attention(name).params if name in ATTENTIONS else ()
        return cls.base_params + tuple(extra)

    @classmethod
    def check(cls, options: Mapping[str, Any], **kwargs: Any) -> Dict[str, Any]:
        out = super().check(options, **kwargs)
        if not get_attention(out["attention"]).keeps_cls and out["residual"]:
            raise InvalidInputError(f"attention '{out['attention']}' changes the token grid; it needs residual=False")
        return out

    @classmethod
    def vfm_roles(cls, options: Mapping[str, Any]) -> Dict[str, Optional[str]]:
        return {"vfm": None} if get_attention(options.get("attention", "vanilla")).uses_vfm else {}

    def forward(self, model, crops: torch.Tensor, context: WindowContext) -> torch.Tensor:
        attention = get_attention(self.options["attention"])
        vfm_feats = model.vfm_features(crops) if attention.uses_vfm else None
        params = {p.name: self.options[p.name] for p in attention.params}
        return model.clip.forward_dense(crops, attention, residual=self.options["residual"],
                                        ffn=self.options["ffn"], vfm_feats=vfm_feats, **params)
