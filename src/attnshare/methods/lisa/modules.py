"""LiSA layers: the previous layer's attention re-aligned over heads, plus a low-rank Q/K correction.

Notation: B batch, T new tokens, S keys, H query heads, Hkv kv heads, G = H / Hkv, d head dim, r low-rank width,
m hidden width of the alignment FFN, D hidden size.

    S_l = g_l(Z_{l-1}) + q_lr k_lr^T / sqrt(r)      then the layer's mask and softmax, then P_l V_l and o_proj
    g_l(z) = W_skip z + W_down gelu(W_up z + b)      over the head axis at every (query, key) position

At initialisation W_skip is the best head permutation, W_down = 0 and W_k^lr = 0, so S_l equals the donor's
scores with heads permuted exactly (aligned direct sharing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...attention.context import DonorState, ShareContext
from ...attention.functional import apply_mask, apply_probs, grouped_matmul, softmax_probs

PROB_FLOOR = 1e-30  # probabilities are combined in log space; this floors log(0) of masked entries


def fill_masked(z: torch.Tensor) -> torch.Tensor:
    """Masked (-inf) donor entries -> 0, so the head FFN sees finite values; the layer's own mask is re-applied."""
    return torch.where(torch.isfinite(z), z, torch.zeros((), dtype=z.dtype, device=z.device))


def align_keys(z: torch.Tensor, keys: int) -> torch.Tensor:
    """End-align the key axis of (B,H,T,S') to S = ``keys`` (a sliding-window layer caches fewer keys)."""
    have = z.shape[-1]
    if have == keys:
        return z
    if have > keys:
        return z[..., have - keys:]  # (B,H,T,S)
    return F.pad(z, (keys - have, 0))  # (B,H,T,S), zeros before the donor's first cached key


def mix_heads(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Linear map over the head axis: weight (Hout,Hin), z (B,Hin,T,S) -> (B,Hout,T,S)."""
    b, h, t, s = z.shape
    out = torch.matmul(weight.to(z.dtype), z.reshape(b, h, t * s))  # (B,Hout,T*S)
    return out.view(b, weight.shape[0], t, s)


def permutation_matrix(head_map: list[int]) -> torch.Tensor:
    """(H,H) with row h selecting donor head ``head_map[h]``."""
    eye = torch.eye(len(head_map))
    return eye[torch.tensor(head_map, dtype=torch.long)]


def rope_subset(cos: torch.Tensor, sin: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """r-dim rotary tables from the layer's d-dim ones: r/2 frequencies spread over the spectrum.

    cos, sin (B,T,d) in HF's rotate-half layout (each half repeats the d/2 frequencies) -> (B,1,T,r).
    """
    half = cos.shape[-1] // 2
    idx = torch.arange(rank // 2, device=cos.device) * half // (rank // 2)  # (r/2,) frequency indices
    cos_r = torch.cat([cos[..., idx], cos[..., idx]], dim=-1)  # (B,T,r)
    sin_r = torch.cat([sin[..., idx], sin[..., idx]], dim=-1)  # (B,T,r)
    return cos_r.unsqueeze(1), sin_r.unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B,h,T,r) with tables (B,1,T,r) (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def low_rank_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B,H,T,r), k (B,Hkv,S,r) -> q k^T / sqrt(r) as (B,H,T,S) float32 (k never expanded over groups)."""
    return grouped_matmul(q, k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])


class HeadAligner(nn.Module):
    """g_l: tiny FFN over the head axis with a permutation-initialised skip path and a zero-initialised MLP."""

    def __init__(self, head_map: list[int], width: int, generator: torch.Generator) -> None:
        super().__init__()
        h = len(head_map)
        self.skip = nn.Parameter(permutation_matrix(head_map))  # (H,H)
        self.width = width
        if width:
            m = width * h
            bound = 1.0 / math.sqrt(h)
            self.up = nn.Parameter(torch.empty(m, h).uniform_(-bound, bound, generator=generator))  # (m,H)
            self.up_bias = nn.Parameter(torch.zeros(m))  # (m,)
            self.down = nn.Parameter(torch.zeros(h, m))  # (H,m)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B,H,T,S) float32 -> (B,H,T,S)."""
        out = mix_heads(z, self.skip)
        if self.width:
            hidden = F.gelu(mix_heads(z, self.up) + self.up_bias.view(1, -1, 1, 1))  # (B,m,T,S)
            out = out + mix_heads(hidden, self.down)
        return out


class LiSAAttention(nn.Module):
    """Replaces a LiSA layer's attention: own V and o_proj, low-rank q/k, donor attention re-aligned.

    Its cache slot holds the low-rank k (Hkv*r per token) as keys and V; it publishes its own masked scores and
    probabilities when the next layer reads them.
    """

    def __init__(self, base: nn.Module, v_name: str, o_name: str, layer: int, context: ShareContext,
                 head_map: list[int], *, hidden_size: int, num_kv_heads: int, head_dim: int, rank: int,
                 ffn_width: int, source: str, rope: bool) -> None:
        super().__init__()
        self.v_name, self.o_name = v_name, o_name
        self.add_module(v_name, getattr(base, v_name))
        self.add_module(o_name, getattr(base, o_name))
        self.layer_idx = layer
        self.donor = layer - 1
        self.context = context
        self.num_heads, self.num_kv_heads = len(head_map), num_kv_heads
        self.head_dim, self.rank = head_dim, rank
        self.source, self.rope = source, rope
        ref = getattr(base, v_name).weight
        gen = torch.Generator().manual_seed(7919 * (layer + 1))  # deterministic init, independent of global RNG
        self.lisa_align = HeadAligner(head_map, ffn_width, gen).to(ref.device, ref.dtype)
        self.lisa_q = nn.Linear(hidden_size, self.num_heads * rank, bias=False, device=ref.device, dtype=ref.dtype)
        self.lisa_k = nn.Linear(hidden_size, num_kv_heads * rank, bias=False, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(hidden_size)
            self.lisa_q.weight.copy_(torch.empty(self.lisa_q.weight.shape).uniform_(-bound, bound, generator=gen))
            self.lisa_k.weight.zero_()  # the correction q_lr k_lr^T starts at exactly zero

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, **kwargs):
        b, t, _ = hidden_states.shape
        v = getattr(self, self.v_name)(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B,Hkv,T,d)
        q, k = self.low_rank(hidden_states, position_embeddings)  # (B,H,T,r), (B,Hkv,T,r)
        if past_key_values is not None:  # the cache stores k_lr (B,Hkv,S,r) and V, no full K
            k, v = past_key_values.update(k, v, self.layer_idx)
        scores = self.scores(self.context.consume(self.donor, self.layer_idx), q, k, attention_mask)  # (B,H,T,S)
        probs = softmax_probs(scores, v.dtype)  # (B,H,T,S)
        if self.context.publishes(self.layer_idx):
            self.context.publish(self.layer_idx, DonorState(probs=probs, scores=scores, mask=attention_mask))
        out = apply_probs(probs, v)  # (B,T,H,d)
        return getattr(self, self.o_name)(out.reshape(b, t, -1)), probs

    def low_rank(self, hidden_states: torch.Tensor, position_embeddings=None) -> tuple[torch.Tensor, torch.Tensor]:
        """q_lr (B,H,T,r) and k_lr (B,Hkv,T,r) of this layer's input, rotated when ``rope``."""
        b, t, _ = hidden_states.shape
        q = self.lisa_q(hidden_states).view(b, t, self.num_heads, self.rank).transpose(1, 2)  # (B,H,T,r)
        k = self.lisa_k(hidden_states).view(b, t, self.num_kv_heads, self.rank).transpose(1, 2)  # (B,Hkv,T,r)
        if self.rope and position_embeddings is not None:
            cos, sin = rope_subset(*position_embeddings, self.rank)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k

    def scores(self, donor: DonorState, q: torch.Tensor, k: torch.Tensor, mask) -> torch.Tensor:
        """Masked combined scores S_l (B,H,T,S) float32."""
        z = donor.scores if self.source == "scores" else donor.probs
        if z is None:
            raise RuntimeError(f"layer {self.donor} published no {self.source} for LiSA layer {self.layer_idx}")
        z = align_keys(fill_masked(z.float()), k.shape[-2])  # (B,H,T,S)
        aligned = self.lisa_align(z)  # (B,H,T,S)
        if self.source == "probs":
            aligned = aligned.clamp_min(PROB_FLOOR).log()
        return apply_mask(aligned + low_rank_scores(q, k), mask)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, donor={self.donor}, rank={self.rank}, source={self.source}, rope={self.rope}"
