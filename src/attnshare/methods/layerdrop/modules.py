"""A removed decoder block: the residual stream passes through; the cache slot counts tokens and stores nothing."""

from __future__ import annotations

import torch
from torch import nn

from ...hf_compat import decoder_layer_output, module_cache, update_length_only


class SkippedBlock(nn.Module):
    """Stands where a decoder block was: hidden states (B,T,D) in, the same hidden states out."""

    computes_attention = False

    def __init__(self, layer_idx: int, num_kv_heads: int) -> None:
        super().__init__()
        self.layer_idx, self.num_kv_heads = layer_idx, num_kv_heads

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = module_cache(kwargs)
        if cache is not None:
            update_length_only(cache, self.layer_idx, hidden_states, self.num_kv_heads)
        return decoder_layer_output(hidden_states)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}"
