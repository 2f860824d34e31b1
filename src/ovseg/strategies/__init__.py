"""Dense strategies (the per-window computation of each method) and their registry."""
from .base import (
    STRATEGIES,
    DenseStrategy,
    ImageContext,
    WindowContext,
    cosine_logits,
    get_strategy,
    list_strategies,
    register_strategy,
)
from .corrclip import CorrCLIP  # CorrCLIP (ICCV 2025)
from .last_block import LastBlock
from .trident import Trident

__all__ = [
    "DenseStrategy", "ImageContext", "WindowContext", "STRATEGIES", "register_strategy", "get_strategy",
    "list_strategies", "cosine_logits", "LastBlock",
    "CorrCLIP", "Trident",
]
