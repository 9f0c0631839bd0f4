"""LiSA layers: the previous layer's attention re-aligned over heads, plus a low-rank Q/K correction.

Notation: B batch, T new tokens, S keys, H query heads, Hkv kv heads, G = H / Hkv, d head dim, r low-rank width,
m hidden width of the alignment FFN, D hidden size.

    S_l = g_l(Z_{l-1}) + q_lr k_lr^T / sqrt(r)      then the layer's mask and softmax, then P_l V_l and o_proj
    g_l(z) = W_skip z + W_down gelu(W_up z + b)      over the head axis at every (query, key) position

At initialisation W_skip is the best head permutation, W_down = 0 and W_k^lr = 0, so S_l equals the donor's
scores with heads permuted exactly (aligned direct sharing, ``init="permutation"``); a fitted start
(``init="fit"``, see fit.py) sets W_skip and the low-rank q/k from the base layer instead.

Without gradients (evaluation, generation, benchmarks) a prefill runs in blocks of query rows: each block reads
only the keys its causal mask can reach, so the (B,H,rows,S) working set stays small and half of the score matrix
is never computed. A donor that ran fused SDPA publishes its Q and K, and each block recomputes its slice of the
donor's scores from them, so no layer materialises a full (T,S) map unless a later LiSA layer reads it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...attention.context import AttentionBlock, DonorState, ShareContext
from ...attention.functional import (
    apply_mask,
    apply_probs,
    causal_bool_mask,
    raw_scores,
    reachable_keys,
    softmax_probs,
)
from ...hf_compat import module_cache, slot_start, update_kv
from .kernels import fill_masked, head_ffn

PROB_FLOOR = 1e-30  # probabilities are combined in log space; this floors log(0) of masked entries
BLOCK_ROWS = 128  # query rows per block of a gradient-free prefill (chosen by measurement, see docs/RESULTS.md)
# Score entries (B*H*rows*keys) per block at most: SmolLM2's 128 rows of 9 heads over 2,048 keys at batch 1. Larger
# batches or longer prompts take fewer rows, so a block's float32 temporaries (its head FFN's 2H channels: 19 MB)
# stay below glibc's largest reusable free block (32 MB, see attnshare.allocator) instead of being mapped afresh.
BLOCK_ENTRIES = 128 * 9 * 2048
MIN_BLOCK_ROWS = 16
# Under torch.compile the block loop is unrolled and every block's code generated: at least this many rows per block
# (a 2,048-token prefill of 16 LiSA layers compiled for 560 s with 128-row blocks on the 2-core box)
COMPILED_BLOCK_ROWS = 512


def slice_mask(mask: torch.Tensor | None, rows: slice, keys: int) -> torch.Tensor | None:
    """The (..., rows, :keys) part of an HF mask; ``None`` stays None (causal aligned to the end of the keys)."""
    return None if mask is None else mask[..., rows, :keys]


def donor_block(state: DonorState, source: str, rows: slice, keys: int) -> tuple[torch.Tensor, bool]:
    """The donor's ``source`` attention for query ``rows`` over its first ``keys`` keys, (B,H,rows,keys) float32,
    and whether it is finite (no -inf where masked, so the head FFN can read it as is).

    Read from the donor's published blocks or maps, else recomputed from its Q and K (a causal block's rows never
    see later keys, so a softmax over the first ``keys`` keys equals the full row's). A donor with the plain
    causal mask (``None``) hides a subset of what every consumer hides, so its scores are left unmasked: the
    consumer masks its own sum. Any other donor mask (sliding window, padding) is applied."""
    if state.blocks is not None:
        block = state.block_at(rows, keys)
        if block is not None:
            return getattr(block, source), source == "probs" or block.finite
        state = state.whole()
    stored = state.scores if source == "scores" else state.probs
    if stored is not None:
        return stored[..., rows, :keys].float(), source == "probs"
    if state.q is None:
        raise RuntimeError(f"a LiSA layer's donor published neither its {source} nor its Q and K")
    scores = raw_scores(state.q[..., rows, :], state.k[..., :keys, :], state.scaling, state.softcap)
    if source == "scores" and state.mask is None:
        return scores, True  # (B,H,rows,keys)
    scores = apply_mask(scores, slice_mask(state.mask, rows, keys))
    return (scores, False) if source == "scores" else (softmax_probs(scores, torch.float32), True)


def donor_keys(state: DonorState) -> int:
    """Number of keys the donor's published attention covers."""
    if state.blocks:
        return state.blocks[-1].keys
    if state.k is not None:
        return state.k.shape[-2]
    maps = state.scores if state.scores is not None else state.probs
    return 0 if maps is None else maps.shape[-1]


def mask_causal_tail_(scores: torch.Tensor) -> torch.Tensor:
    """In place: causal mask of (B,H,rows,keys) scores whose last row sits at the last key. Only the trailing
    rows x rows square holds masked entries, so only it is touched."""
    rows = scores.shape[-2]
    tail = scores[..., scores.shape[-1] - rows:]  # (B,H,rows,rows)
    tail.masked_fill_(~causal_bool_mask(rows, rows, scores.device), float("-inf"))
    return scores


def align_keys(z: torch.Tensor, keys: int, shift: int) -> torch.Tensor:
    """The donor's (B,H,T,S') map on this layer's S = ``keys`` keys, whose first key is the donor's key ``shift``
    (sliding and full layers cache different spans of tokens): zeros where the donor holds no such key."""
    have = z.shape[-1]
    if shift == 0 and have == keys:
        return z
    lo, hi = max(shift, 0), min(shift + keys, have)  # donor keys that this layer also holds
    before = max(-shift, 0)
    if hi <= lo:
        return z.new_zeros(*z.shape[:-1], keys)
    return F.pad(z[..., lo:hi], (before, keys - before - (hi - lo)))  # (B,H,T,S)


def mix_heads(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              add: torch.Tensor | None = None) -> torch.Tensor:
    """Linear map over the head axis, ``add + weight z + bias``: weight (Hout,Hin), z (B,Hin,T,S) -> (B,Hout,T,S).

    One batched GEMM with the weight broadcast over the batch (a 2-D @ 3-D matmul would transpose z first)."""
    b, h, t, s = z.shape
    w = weight.to(z.dtype).expand(b, *weight.shape)  # (B,Hout,Hin)
    flat = z.reshape(b, h, t * s)  # (B,Hin,T*S)
    if add is not None:
        out = torch.baddbmm(add.reshape(b, weight.shape[0], t * s), w, flat)
    elif bias is not None:
        out = torch.baddbmm(bias.to(z.dtype).view(1, -1, 1), w, flat)
    else:
        out = torch.bmm(w, flat)  # (B,Hout,T*S)
    return out.view(b, weight.shape[0], t, s)


def permutation_matrix(head_map: list[int]) -> torch.Tensor:
    """(H,H) with row h selecting donor head ``head_map[h]``."""
    eye = torch.eye(len(head_map))
    return eye[torch.tensor(head_map, dtype=torch.long)]


def spread_frequencies(half: int, rank: int) -> list[int]:
    """r/2 of a head's F = ``half`` rotary frequency pairs, spread evenly over the spectrum (the default)."""
    return [i * half // (rank // 2) for i in range(rank // 2)]


def rope_subset(cos: torch.Tensor, sin: torch.Tensor, frequencies: list[int] | None, rank: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """r-dim rotary tables from the layer's d-dim ones: the r/2 ``frequencies`` (None: spread evenly).

    cos, sin (B,T,d) in HF's rotate-half layout (each half repeats the d/2 frequencies) -> (B,1,T,r).
    """
    half = cos.shape[-1] // 2
    idx = torch.tensor(frequencies or spread_frequencies(half, rank), device=cos.device)  # (r/2,)
    cos_r = torch.cat([cos[..., idx], cos[..., idx]], dim=-1)  # (B,T,r)
    sin_r = torch.cat([sin[..., idx], sin[..., idx]], dim=-1)  # (B,T,r)
    return cos_r.unsqueeze(1), sin_r.unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B,h,T,r) with tables (B,1,T,r) (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def add_low_rank_(scores: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """In place: scores (B,H,T,S) float32 += q k^T / sqrt(r), q (B,H,T,r), k (B,Hkv,S,r), in one GEMM per kv head
    (k never expanded over groups; no (B,H,T,S) temporary)."""
    b, h, t, s = scores.shape
    hkv, r = k.shape[1], k.shape[-1]
    q = q.to(scores.dtype).reshape(b * hkv, (h // hkv) * t, r)  # (B*Hkv, G*T, r): head h = kv*G + g
    k_t = k.to(scores.dtype).reshape(b * hkv, s, r).transpose(1, 2)  # (B*Hkv, r, S)
    scores.view(b * hkv, (h // hkv) * t, s).baddbmm_(q, k_t, alpha=1.0 / math.sqrt(r))
    return scores


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

    def forward(self, z: torch.Tensor, fill: bool = False, fused: bool = False) -> torch.Tensor:
        """z (B,H,T,S) float32 -> (B,H,T,S); with ``fill`` masked (-inf) entries of z read as 0. ``fused`` (an eager
        gradient-free prefill block on the fast path): the fused kernel of kernels.py where available."""
        if fused:
            mlp = (self.up, self.up_bias, self.down) if self.width else (None, None, None)
            out = head_ffn(z, self.skip, *mlp, fill)
            if out is not None:
                return out
        z = fill_masked(z) if fill else z
        out = mix_heads(z, self.skip)
        if self.width:
            hidden = F.gelu(mix_heads(z, self.up, bias=self.up_bias))  # (B,m,T,S)
            out = mix_heads(hidden, self.down, add=out)
        return out


class LiSAAttention(nn.Module):
    """Replaces a LiSA layer's attention: own V and o_proj, low-rank q/k, donor attention re-aligned.

    Its cache slot holds the low-rank k (Hkv*r per token) as keys and V; when the next layer reads it, it publishes
    its scores and probabilities (whole maps, or the blocks of a blockwise prefill).
    """

    def __init__(self, base: nn.Module, v_name: str, o_name: str, layer: int, context: ShareContext,
                 head_map: list[int], *, hidden_size: int, num_kv_heads: int, head_dim: int, rank: int,
                 ffn_width: int, source: str, rope: bool, block_rows: int = BLOCK_ROWS,
                 frequencies: list[int] | None = None) -> None:
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
        self.frequencies = frequencies  # rotary frequency pairs of the low-rank q/k (None: spread evenly)
        self.block_rows = block_rows  # 0: always whole maps
        ref = getattr(base, v_name).weight
        gen = torch.Generator().manual_seed(7919 * (layer + 1))  # deterministic init, independent of global RNG
        self.lisa_align = HeadAligner(head_map, ffn_width, gen).to(ref.device, ref.dtype)
        self.lisa_q = nn.Linear(hidden_size, self.num_heads * rank, bias=False, device=ref.device, dtype=ref.dtype)
        self.lisa_k = nn.Linear(hidden_size, num_kv_heads * rank, bias=False, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(hidden_size)
            self.lisa_q.weight.copy_(torch.empty(self.lisa_q.weight.shape).uniform_(-bound, bound, generator=gen))
            self.lisa_k.weight.zero_()  # the correction q_lr k_lr^T starts at exactly zero

    def start_from(self, mixing: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor) -> None:
        """A fitted start: head mixing (H,H) of the skip path, low-rank q (H*r, D) and k (Hkv*r, D) weights."""
        with torch.no_grad():
            self.lisa_align.skip.copy_(mixing)
            self.lisa_q.weight.copy_(q_weight)
            self.lisa_k.weight.copy_(k_weight)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        b, t, _ = hidden_states.shape
        v = getattr(self, self.v_name)(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B,Hkv,T,d)
        q, k = self.low_rank(hidden_states, position_embeddings)  # (B,H,T,r), (B,Hkv,T,r)
        cache = module_cache(kwargs)
        if cache is not None:  # the cache stores k_lr (B,Hkv,S,r) and V, no full K
            k, v = update_kv(cache, self.layer_idx, k, v)
            k, v = reachable_keys(attention_mask, t, k, v)  # a static cache's first prefill: its real keys only
        donor = self.context.consume(self.donor, self.layer_idx)
        shift = 0 if cache is None else self.key_shift(cache, donor_keys(donor), k.shape[-2])
        if self.blockwise(donor, b, t, k.shape[-2], shift):
            out = self.blocked_attention(donor, q, k, v, attention_mask)  # (B,T,H,d)
            return getattr(self, self.o_name)(out.reshape(b, t, -1)), None
        scores = self.scores(donor, q, k, attention_mask, shift)  # (B,H,T,S)
        probs = softmax_probs(scores, v.dtype)  # (B,H,T,S)
        if self.context.publishes(self.layer_idx):
            self.context.publish(self.layer_idx, DonorState(probs=probs, scores=scores, mask=attention_mask))
        out = apply_probs(probs, v)  # (B,T,H,d)
        return getattr(self, self.o_name)(out.reshape(b, t, -1)), probs

    def blockwise(self, donor: DonorState, batch: int, rows: int, keys: int, shift: int = 0) -> bool:
        """Run in query blocks: no gradients (autograd and attention-map capture need the whole map), a prefill
        longer than one block, and a donor covering exactly this layer's keys (same count, ``shift`` 0)."""
        return (not torch.is_grad_enabled() and 0 < self.rows_per_block(batch, keys) < rows
                and donor_keys(donor) == keys and shift == 0)

    def rows_per_block(self, batch: int, keys: int) -> int:
        """Query rows per block: ``block_rows`` (0: whole maps), fewer where ``batch`` x heads x ``keys`` would
        exceed BLOCK_ENTRIES (at least MIN_BLOCK_ROWS), and at least COMPILED_BLOCK_ROWS while compiling (the
        compiled graph plans its own buffers). Every LiSA layer of a prefill gets the same count, so a reader's
        blocks line up with its donor's."""
        if not self.block_rows:
            return 0
        if torch.compiler.is_compiling():
            return max(self.block_rows, COMPILED_BLOCK_ROWS)
        fits = BLOCK_ENTRIES // max(batch * self.num_heads * keys, 1)
        return min(self.block_rows, max(fits, MIN_BLOCK_ROWS))

    def blocked_attention(self, donor: DonorState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor | None) -> torch.Tensor:
        """P_l V_l block by block over query rows: q (B,H,T,r), k (B,Hkv,S,r), v (B,Hkv,S,d) -> (B,T,H,d).

        Block [i0, i1) reads keys [0, S - T + i1): later keys are causally masked for all its rows. When a later
        layer reads this one, the blocks themselves are published (its blocks line up with them)."""
        b, h, t, _ = q.shape
        s = k.shape[-2]
        out = v.new_empty(b, t, h, v.shape[-1])  # (B,T,H,d)
        publish = self.context.publishes(self.layer_idx)
        blocks = []
        step = self.rows_per_block(b, s)
        for start in range(0, t, step):
            rows = slice(start, min(t, start + step))
            keys = s - t + rows.stop
            z, finite = donor_block(donor, self.source, rows, keys)  # (B,H,rows,keys)
            aligned = self.aligned_sum(z, finite, q[..., rows, :], k[..., :keys, :],
                                       fused=self.context.fused_kernels)  # (B,H,rows,keys), unmasked
            if mask is None:  # plain causal: publish the unmasked sum, readers mask their own
                scores = mask_causal_tail_(aligned.clone() if publish else aligned)
            else:  # sliding window or padding: readers must see this layer's mask
                scores = aligned = apply_mask(aligned, slice_mask(mask, rows, keys))
            probs = softmax_probs(scores, v.dtype, every_row_sees_a_key=mask is None)  # causal: key 0 at least
            out[:, rows] = apply_probs(probs, v[..., :keys, :])
            if publish:
                blocks.append(AttentionBlock(rows, keys, scores=aligned, probs=probs, finite=mask is None))
        if publish:
            self.context.publish(self.layer_idx, DonorState(blocks=blocks, mask=mask))
        return out

    def low_rank(self, hidden_states: torch.Tensor, position_embeddings=None) -> tuple[torch.Tensor, torch.Tensor]:
        """q_lr (B,H,T,r) and k_lr (B,Hkv,T,r) of this layer's input, rotated when ``rope``."""
        b, t, _ = hidden_states.shape
        q = self.lisa_q(hidden_states).view(b, t, self.num_heads, self.rank).transpose(1, 2)  # (B,H,T,r)
        k = self.lisa_k(hidden_states).view(b, t, self.num_kv_heads, self.rank).transpose(1, 2)  # (B,Hkv,T,r)
        if self.rope and position_embeddings is not None:
            cos, sin = rope_subset(*position_embeddings, self.frequencies, self.rank)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k

    def key_shift(self, cache, donor_keys: int, keys: int) -> int:
        """Tokens from the donor's first returned key to this layer's (a sliding and a full layer cache different
        spans: in a dynamic cache both end at the newest token, in a static one a full slot starts at token 0)."""
        return slot_start(cache, self.layer_idx, keys) - slot_start(cache, self.donor, donor_keys)

    def scores(self, donor: DonorState, q: torch.Tensor, k: torch.Tensor, mask, shift: int = 0) -> torch.Tensor:
        """Masked combined scores S_l (B,H,T,S) float32, the whole map at once; ``shift`` as in :meth:`key_shift`."""
        z, finite = donor_block(donor, self.source, slice(None), donor_keys(donor))  # (B,H,T,S')
        return apply_mask(self.aligned_sum(align_keys(z, k.shape[-2], shift), finite, q, k), mask)

    def aligned_sum(self, z: torch.Tensor, finite: bool, q: torch.Tensor, k: torch.Tensor,
                    fused: bool = False) -> torch.Tensor:
        """Unmasked g_l(Z) + q_lr k_lr^T / sqrt(r): z (B,H,T,S), q (B,H,T,r), k (B,Hkv,S,r) -> (B,H,T,S) float32;
        ``fused``: a prefill block, whose head FFN may run as one kernel."""
        aligned = self.lisa_align(z, fill=not finite, fused=fused)  # (B,H,T,S)
        if self.source == "probs":
            aligned = aligned.clamp_min(PROB_FLOOR).log()
        return add_low_rank_(aligned.contiguous(), q, k)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, donor={self.donor}, rank={self.rank}, source={self.source}, rope={self.rope}"
