"""The SA receiver: the donor's attention applied to this layer's own V; no q/k projections exist here.

Notation: B batch, T new tokens, S keys, H query heads, Hkv kv heads, G = H / Hkv, d head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from ...attention.context import DonorState, ShareContext
from ...attention.functional import apply_probs, fused_attention, reachable_keys, repeat_kv
from ...hf_compat import module_cache, update_value_only


def reuse_attention(state: DonorState, v: torch.Tensor, head_map: torch.Tensor | None) -> torch.Tensor:
    """O = P_donor · V for receiver heads: v (B,Hkv,S,d) -> (B,T,H,d).

    ``head_map[h]`` is the donor head whose attention receiver head h uses (None: the same head).
    """
    state = state.whole()  # a blockwise (LiSA) donor's blocks as one map
    if state.probs is not None:  # decode, or probabilities materialised by the donor
        probs = state.probs if head_map is None else state.probs[:, head_map]  # (B,H,T,S)
        return apply_probs(probs, v)
    q, k = state.q, state.k  # (B,H,T,d), (B,Hkv,S,d)
    if head_map is not None:
        groups = q.shape[1] // k.shape[1]
        q = q[:, head_map]  # (B,H,T,d) donor head map[h] for receiver head h
        k = repeat_kv(k, groups)[:, head_map]  # (B,H,S,d)
        v = repeat_kv(v, groups)  # (B,H,S,d) receiver head h keeps its own V group h // G
    return fused_attention(q, k, v, state.mask, state.scaling)  # SDPA(Q_donor, K_donor, V_l) == P_donor V_l


class SharedAttentionReceiver(nn.Module):
    """Replaces a receiver layer's attention: V and o_proj are the layer's own; its cache slot holds V only."""

    def __init__(self, base: nn.Module, v_name: str, o_name: str, donor: int, context: ShareContext,
                 head_map: list[int] | None, head_dim: int) -> None:
        super().__init__()
        self.v_name, self.o_name = v_name, o_name
        self.add_module(v_name, getattr(base, v_name))
        self.add_module(o_name, getattr(base, o_name))
        self.layer_idx = base.layer_idx
        self.head_dim = head_dim
        self.donor = donor
        self.context = context
        self.register_buffer(
            "head_map", torch.tensor(head_map, dtype=torch.long) if head_map else None, persistent=False
        )

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        b, t, _ = hidden_states.shape
        v = getattr(self, self.v_name)(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B,Hkv,T,d)
        cache = module_cache(kwargs)
        if cache is not None:  # zero-width K: the cache really stores no K for this layer
            v = update_value_only(cache, self.layer_idx, v)  # (B,Hkv,S,d)
            (v,) = reachable_keys(attention_mask, t, v)  # a static cache's first prefill: its real keys only
        state = self.context.consume(self.donor, self.layer_idx)
        out = reuse_attention(state, v, self.head_map)  # (B,T,H,d)
        return getattr(self, self.o_name)(out.reshape(b, t, -1)), None

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, donor={self.donor}, aligned={self.head_map is not None}"
