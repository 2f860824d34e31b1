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
from .cass import CASS  # CASS (CVPR 2025)
from .corrclip import CorrCLIP  # CorrCLIP (ICCV 2025)
from .last_block import LastBlock
from .resclip import ResCLIP  # noqa: F401  (registers "resclip")
from .scclip import SCCLIP  # noqa: F401  (registers "scclip")
from .trident import Trident  # noqa: F401  (registers "trident")

__all__ = [
    "DenseStrategy", "ImageContext", "WindowContext", "STRATEGIES", "register_strategy", "get_strategy",
    "list_strategies", "cosine_logits", "LastBlock",
    "CASS", "CorrCLIP", "Trident",
]
