"""LiSA (arXiv 2408.01890): previous-layer attention re-aligned over heads plus a low-rank Q/K correction."""

from .config import LiSAConfig, default_rank
from .method import LiSA
from .modules import HeadAligner, LiSAAttention
from .plan import LiSAPlan

__all__ = ["HeadAligner", "LiSA", "LiSAAttention", "LiSAConfig", "LiSAPlan", "default_rank"]
