"""SA — Shared Attention (arXiv 2407.12866): receivers reuse a donor layer's attention probabilities."""

from .config import SAConfig
from .method import SA
from .modules import SharedAttentionReceiver, reuse_attention
from .plan import SAPlan

__all__ = ["SA", "SAConfig", "SAPlan", "SharedAttentionReceiver", "reuse_attention"]
