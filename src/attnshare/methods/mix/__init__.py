"""Mix — a planner that chooses, per layer, among keep, SA receiver (heads aligned) and drop, to lose least under a
KV-cache or parameter budget. Training-free: LiSA layers need training and are not among its choices yet.
"""

from .config import MixConfig
from .method import Mix
from .plan import MixPlan

__all__ = ["Mix", "MixConfig", "MixPlan"]
