"""LayerDrop — whole decoder blocks removed (attention and MLP), the other simple alternative to sharing.

Blocks are chosen by measured loss (greedy KL on calibration text) or by ShortGPT's block influence. A removed
block passes the residual stream through unchanged, has no parameters and stores nothing in the KV cache.
"""

from .config import LayerDropConfig
from .method import LayerDrop
from .modules import SkippedBlock
from .plan import LayerDropPlan

__all__ = ["LayerDrop", "LayerDropConfig", "LayerDropPlan", "SkippedBlock"]
