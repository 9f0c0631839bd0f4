"""The dropped attention sublayer: no parameters, no cached K or V, no contribution to the residual stream."""

from __future__ import annotations

import torch
from torch import nn

from ...hf_compat import module_cache, update_length_only


class DroppedAttention(nn.Module):
    """Stands where a layer's attention was: returns zeros (B,T,D) and caches only a token count (zero bytes)."""

    computes_attention = False  # nothing here for a later layer to reuse (see attention.dispatch.set_hook)

    def __init__(self, layer_idx: int, num_kv_heads: int) -> None:
        super().__init__()
        self.layer_idx, self.num_kv_heads = layer_idx, num_kv_heads

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        cache = module_cache(kwargs)
        if cache is not None:  # the slot keeps its length (positions, masks, beam reordering) and no tensor bytes
            update_length_only(cache, self.layer_idx, hidden_states, self.num_kv_heads)
        return torch.zeros_like(hidden_states), None

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}"
