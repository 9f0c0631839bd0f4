"""PostShare (arXiv 2402.11819): regularised post-training that pulls matched units together, then DirectShare."""

from .config import PostShareConfig
from .method import PostShare, pair_regulariser, pair_slices
from .plan import PostSharePlan

__all__ = ["PostShare", "PostShareConfig", "PostSharePlan", "pair_regulariser", "pair_slices"]
