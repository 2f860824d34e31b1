"""DenseModel: CLIP + optional VFM(s) + a dense strategy + normalisation buffers, as one ``nn.Module``.

``model(crops)`` maps CLIP-normalised windows (N, 3, h, w) to unit-norm dense features (N, E, h', w') in CLIP's
joint space, so ``.to()``, ``.half()``, ``torch.compile``, forward hooks and ``state_dict`` behave as PyTorch users
expect. :class:`ovseg.Segmenter` is the predictor around it (inputs, labels, windows, head, results), in the
spirit of segment-anything's ``Sam`` / ``SamPredictor`` split. See docs/architecture.md.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones.hooks import Collect, Intermediates
from .config import CLIP_MEAN, CLIP_STD
from .errors import InvalidInputError
from .strategies.base import DenseStrategy, WindowContext

__all__ = ["DenseModel"]


class DenseModel(nn.Module):
    """The dense model of a method.

    Args:
        clip: a CLIP backbone (``ovseg.backbones.CLIPAdapter`` or anything implementing
            :class:`ovseg.backbones.CLIPBackbone`).
        strategy: the method's :class:`ovseg.strategies.DenseStrategy`.
        vfms: VFMs by role (``"vfm"`` is the role ``Segmenter(vfm=...)`` chooses); each has ``mean``/``std``
            (0-1 scale), ``patch_size``, ``embed_dim`` and ``forward_features``.
    """

    def __init__(self, clip: nn.Module, strategy: DenseStrategy, vfms: Optional[Mapping[str, nn.Module]] = None):
        super().__init__()
        self.clip = clip
        self.strategy = strategy
        self.vfms = nn.ModuleDict(dict(vfms or {}))
        # the exact CLIP statistics: windows arrive normalised with them, VFMs get them undone (docs/methods.md)
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        for role, vfm in self.vfms.items():
            stats = torch.tensor([tuple(vfm.mean), tuple(vfm.std)], dtype=torch.float32).view(2, 1, 3, 1, 1)
            self.register_buffer(f"_vfm_stats_{role}", stats, persistent=False)
        strategy.setup(self)  # parts of the strategy that depend on the backbones (e.g. a decoder of a VFM's file)

    # ------------------------------------------------------------------ VFMs
    @property
    def vfm(self) -> Optional[nn.Module]:
        """The VFM of role ``"vfm"`` (None if the method uses none)."""
        return self.vfms["vfm"] if "vfm" in self.vfms else None

    def _get_vfm(self, role: str) -> nn.Module:
        if role not in self.vfms:
            raise InvalidInputError(f"this model has no VFM for role '{role}' (roles: {sorted(self.vfms) or 'none'})")
        return self.vfms[role]

    def vfm_input(self, crops: torch.Tensor, role: str = "vfm") -> torch.Tensor:
        """CLIP-normalised windows -> the VFM's own normalisation (docs/methods.md, "VFM input")."""
        self._get_vfm(role)
        stats = getattr(self, f"_vfm_stats_{role}").to(crops.dtype)
        return (crops * self.clip_std.to(crops.dtype) + self.clip_mean.to(crops.dtype) - stats[0]) / stats[1]

    def vfm_features(self, crops: torch.Tensor, role: str = "vfm") -> torch.Tensor:
        """The VFM's dense features (N, C, I, J) of CLIP-normalised windows."""
        return self._get_vfm(role).forward_features(self.vfm_input(crops, role))

    def vfm_intermediates(self, crops: torch.Tensor, collect: Collect, role: str = "vfm") -> Intermediates:
        """One VFM forward that also returns the intermediates ``collect`` names (timm ViT VFMs)."""
        vfm = self._get_vfm(role)
        if not hasattr(vfm, "forward_intermediates"):
            raise InvalidInputError(f"VFM '{getattr(vfm, 'name', role)}' cannot return intermediates")
        return vfm.forward_intermediates(self.vfm_input(crops, role), collect)

    # ------------------------------------------------------------------ forward
    @property
    def dtype(self) -> torch.dtype:
        return next(self.clip.parameters()).dtype

    def forward(self, crops: torch.Tensor, *, text: Optional[torch.Tensor] = None,
                context: Optional[WindowContext] = None) -> torch.Tensor:
        """Windows (N, 3, h, w), CLIP-normalised -> unit-norm dense features (N, E, h', w') float32.

        ``text`` (Q, E) is needed by strategies whose windows depend on the labels (``strategy.needs_text``).
        """
        if crops.dim() != 4 or crops.shape[1] != 3:
            raise InvalidInputError(f"crops must be (N, 3, h, w), got shape {tuple(crops.shape)}")
        context = context or WindowContext(text=text)
        if text is not None and context.text is None:
            context.text = text
        if self.strategy.needs_text and context.text is None:
            raise InvalidInputError(f"strategy '{self.strategy.name}' needs the text embeddings: call "
                                    "model(crops, text=T) with T = segmenter.text_embeddings(labels)")
        feats = self.strategy(self, crops.to(self.dtype), context)
        return F.normalize(feats.float(), dim=1)

    def window_logits(self, crops: torch.Tensor, text: torch.Tensor,
                      context: Optional[WindowContext] = None) -> torch.Tensor:
        """Windows -> per-query cosine logits (N, Q, h', w') float32, as the method defines them."""
        context = context or WindowContext(text=text)
        context.text = text
        return self.strategy.window_logits(self, crops.to(self.dtype), text, context).float()

    def describe(self) -> Dict[str, Union[str, Dict[str, str]]]:
        """Names of the parts, for ``repr`` and provenance."""
        return {"clip": getattr(self.clip, "arch", type(self.clip).__name__), "strategy": self.strategy.name,
                "vfms": {r: getattr(v, "name", type(v).__name__) for r, v in self.vfms.items()}}
