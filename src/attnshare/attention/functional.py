"""Pure attention functions.

Notation: B batch, H query heads, Hkv key/value heads, G = H / Hkv, Tq query length, S key length, d head dim.
Masks follow HF conventions: ``None`` (causal, aligned to the end of the keys), boolean (True = attend) or
additive float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, S, d) -> (B, Hkv*G, S, d); query head h reads key/value head h // G."""
    if groups == 1:
        return x
    b, hkv, s, d = x.shape
    return x[:, :, None].expand(b, hkv, groups, s, d).reshape(b, hkv * groups, s, d)


def causal_bool_mask(tq: int, s: int, device: torch.device) -> torch.Tensor:
    """(Tq, S) boolean mask, True where query i (at absolute position S - Tq + i) may attend key j."""
    q_pos = torch.arange(s - tq, s, device=device)[:, None]
    return torch.arange(s, device=device)[None, :] <= q_pos


def reachable_keys(mask: torch.Tensor | None, tq: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Key-side tensors (B,H,S,·): k, v, or v alone, cut to the keys a block of ``tq`` queries can reach.

    A prefill of Tq > 1 tokens into an empty static cache of S > Tq slots comes with no mask: HF relies on SDPA's
    upper-left ``is_causal``, under which only the first Tq keys are real. Cut to them, the block is the plain
    causal case (Tq == S) that every function here reads a missing mask as; anything else passes unchanged."""
    if mask is None and 1 < tq < tensors[0].shape[-2]:
        return tuple(t[..., :tq, :] for t in tensors)  # (B,H,Tq,·)
    return tensors


def grouped_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-head a @ b where b has fewer (kv) heads: a (B,H,M,K), b (B,Hkv,K,N) -> (B,H,M,N), b never expanded."""
    bsz, h, m, _ = a.shape
    hkv = b.shape[1]
    out = torch.matmul(a.reshape(bsz, hkv, (h // hkv) * m, a.shape[-1]), b)  # (B,Hkv,G*M,N)
    return out.view(bsz, h, m, b.shape[-1])


def raw_scores(q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Unmasked pre-softmax scores in float32: q (B,H,Tq,d), k (B,Hkv,S,d) -> (B,H,Tq,S)."""
    scores = grouped_matmul(q, k.transpose(-1, -2)).float().mul_(scaling)  # (B,H,Tq,S), fresh: scaled in place
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return scores


def attention_scores(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scaling: float, softcap: float | None = None
) -> torch.Tensor:
    """Masked pre-softmax scores in float32: q (B,H,Tq,d), k (B,Hkv,S,d) -> (B,H,Tq,S), -inf where masked."""
    return apply_mask(raw_scores(q, k, scaling, softcap), mask)


def apply_mask(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mask (B,H,Tq,S) float32 scores; ``None`` means causal aligned to the end of the keys."""
    tq, s = scores.shape[-2:]
    if mask is None:
        if tq == 1:  # decode: the one query sits at the end and sees every key
            return scores
        mask = causal_bool_mask(tq, s, scores.device)
    else:
        mask = mask[..., :s]
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    # An additive mask (eager attention) marks masked entries with its dtype's minimum: they become -inf, as for a
    # boolean mask, so readers of the scores (LiSA's head FFN) can tell masked entries from finite ones.
    return (scores + mask.float()).masked_fill(mask == torch.finfo(mask.dtype).min, float("-inf"))


def softmax_probs(scores: torch.Tensor, dtype: torch.dtype, every_row_sees_a_key: bool = False) -> torch.Tensor:
    """Row softmax of float32 scores, cast to ``dtype``; fully masked rows give zeros instead of NaN (a pass that
    ``every_row_sees_a_key``, e.g. a causal block without a padding mask, skips)."""
    probs = torch.softmax(scores, dim=-1)
    if not every_row_sees_a_key:  # in place unless autograd needs the softmax output for its backward
        probs = probs.nan_to_num(0.0) if probs.requires_grad else probs.nan_to_num_(0.0)
    return probs.to(dtype)


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scaling: float, softcap: float | None = None
) -> torch.Tensor:
    """Post-softmax probabilities (B,H,Tq,S) in q's dtype (softmax in float32, as HF eager does)."""
    return softmax_probs(attention_scores(q, k, mask, scaling, softcap), q.dtype)


def apply_probs(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs (B,H,Tq,S) @ v (B,Hkv,S,d) -> (B,Tq,H,d), the layout HF attention functions return."""
    return grouped_matmul(probs.to(v.dtype), v).transpose(1, 2).contiguous()


def fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) @ v without materialising probabilities (SDPA).

    q (B,H,Tq,d), k (B,Hk,S,d), v (B,Hv,S,dv) with Hk, Hv dividing H -> (B,Tq,H,dv).
    """
    h = q.shape[1]
    gqa = k.shape[1] == v.shape[1]  # SDPA maps query head h to kv head h // G itself
    if not gqa:
        k = repeat_kv(k, h // k.shape[1])  # (B,H,S,d)
        v = repeat_kv(v, h // v.shape[1])  # (B,H,S,dv)
    tq, s = q.shape[-2], k.shape[-2]
    if mask is None and tq > 1 and tq != s:
        mask = causal_bool_mask(tq, s, q.device)
    if mask is not None:
        mask = mask[..., :s]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None and tq > 1, scale=scaling, enable_gqa=gqa and k.shape[1] != h
    )  # (B,H,Tq,dv)
    return out.transpose(1, 2).contiguous()


def eager_attention(
    module, q, k, v, mask, scaling: float, dropout: float = 0.0, softcap: float | None = None,
    probs: torch.Tensor | None = None, **_,
):
    """HF-compatible eager attention from the pure functions: (out (B,Tq,H,d), probs (B,H,Tq,S)).

    ``probs`` skips recomputing probabilities a caller already has.
    """
    if probs is None:
        probs = attention_probs(q, k, mask, scaling, softcap)
    if dropout and getattr(module, "training", False):
        probs = F.dropout(probs, p=dropout, training=True)
    return apply_probs(probs, v), probs


def gqa_sdpa_attention(module, q, k, v, mask, scaling: float | None = None, dropout: float = 0.0,
                       softcap: float | None = None, **_):
    """HF-compatible SDPA attention that maps each query head onto its KV head inside SDPA (``enable_gqa``), with a
    mask too: (out (B,Tq,H,d), None).

    HF's SDPA function (5.17-5.25) copies K and V G times over (``repeat_kv``) whenever it gets a mask under
    ``torch.compile``, i.e. at every step of a compiled static-cache decode: G x the cache written per step. Soft-capped
    logits (Gemma-2) and training dropout go through the eager function."""
    scaling = module.scaling if scaling is None else scaling
    if softcap is not None or (dropout and getattr(module, "training", False)):
        return eager_attention(module, q, k, v, mask, scaling, dropout, softcap)
    k, v = reachable_keys(mask, q.shape[-2], k, v)
    return fused_attention(q, k, v, mask, scaling), None

