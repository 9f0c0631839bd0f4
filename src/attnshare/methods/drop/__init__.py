"""Drop — the simplest alternative to sharing: the attention sublayer of chosen layers is removed.

A dropped layer keeps its MLP; its attention adds nothing to the residual stream, has no q/k/v/o parameters and
stores nothing in the KV cache. Sharing methods are compared with it at equal KV bytes and equal parameters saved.
"""

from .config import DropConfig
from .method import Drop
from .modules import DroppedAttention
from .plan import DropPlan

__all__ = ["Drop", "DropConfig", "DropPlan", "DroppedAttention"]
