"""Similarity measures between attention maps, as pure functions (SPEC §3.1).

Notation: B batch, H heads, N query rows kept (the first ``skip`` rows are dropped before these functions see
them), S keys. A "row" is one query's attention distribution over keys. JS is in nats, so it lies in [0, ln 2]
and ``1 - JS / ln 2`` lies in [0, 1] (1 = identical rows, 0 = disjoint support).
"""

from __future__ import annotations

import math

import numpy as np
import torch

LN2 = math.log(2.0)


def neg_entropy(p: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis of p log p (0 log 0 = 0): (..., S) -> (...)."""
    return (p * p.clamp_min(1e-30).log()).sum(-1)  # vectorised; xlogy is several times slower on CPU


def causal_pack(maps: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """Keep only the entries a causal map can make non-zero: (B,H,T,S) with T = S -> (B,H,K), query rows >= skip.

    Sums over the packed axis equal sums over (rows, keys), so JS and cosine sums need no zeros.
    """
    t, s = maps.shape[-2:]
    keep = torch.ones(t, s, dtype=torch.bool, device=maps.device).tril()  # (T,S) key <= query
    keep[:skip] = False
    return maps[:, :, keep]  # (B,H,K)


def packed_js_sum(p: torch.Tensor, q: torch.Tensor, p_negent: torch.Tensor, q_negent: torch.Tensor) -> torch.Tensor:
    """Σ over the rows packed in the last axis of row-wise JS: (..., K) x (..., K) -> (...).

    Σ_rows JS = ½ Σ p log p + ½ Σ q log q − Σ m log m with m = (p + q)/2, each sum over every packed entry, and
    Σ m log m = ½ Σ s log s − ½ ln2 Σ s with s = p + q (one product fewer per entry).
    """
    s = p + q
    s_log_s = (s * s.clamp_min(1e-30).log_()).sum(-1)
    return 0.5 * (p_negent + q_negent) - 0.5 * s_log_s + 0.5 * LN2 * s.sum(-1)


def js_divergence(p: torch.Tensor, q: torch.Tensor, p_negent: torch.Tensor | None = None,
                  q_negent: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise Jensen-Shannon divergence in nats: p, q (..., S) broadcastable -> (...), in [0, ln 2].

    JS = ½ Σ p log p + ½ Σ q log q − Σ m log m with m = (p + q) / 2; pass precomputed ``neg_entropy`` terms to
    save work when one map is compared with many.
    """
    p_negent = neg_entropy(p) if p_negent is None else p_negent
    q_negent = neg_entropy(q) if q_negent is None else q_negent
    m = (p + q) * 0.5
    return (0.5 * (p_negent + q_negent) - neg_entropy(m)).clamp(0.0, LN2)


def js_similarity(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row-wise 1 − JS/ln2: p, q (..., S) -> (...), 1 for identical rows, 0 for disjoint ones."""
    return 1.0 - js_divergence(p, q) / LN2


def head_js_similarity(later: torch.Tensor, earlier: torch.Tensor) -> torch.Tensor:
    """Sum over batch and rows of 1 − JS/ln2 between every head pair: (B,H,N,S) x (B,H',N,S) -> (H, H').

    Entry [h, g] compares head h of ``later`` with head g of ``earlier``. Returns sums (divide by B·N for means),
    so a caller can stream over batches. Loops over ``later``'s heads to keep one (B,H',N,S) temporary.
    """
    later_negent, earlier_negent = neg_entropy(later), neg_entropy(earlier)  # (B,H,N), (B,H',N)
    rows = []
    for h in range(later.shape[1]):
        js = js_divergence(later[:, h : h + 1], earlier, later_negent[:, h : h + 1], earlier_negent)  # (B,H',N)
        rows.append((1.0 - js / LN2).sum(dim=(0, 2)))  # (H',)
    return torch.stack(rows)  # (H, H')


def flat_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of flattened maps along the last axis: a (..., K), b (..., K) -> (...)."""
    dot = (a * b).sum(-1)
    return dot / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)


def head_cosine(later: torch.Tensor, earlier: torch.Tensor) -> torch.Tensor:
    """Sum over batch of the cosine of every head pair's flattened maps: (B,H,N,S) x (B,H',N,S) -> (H, H')."""
    a = later.flatten(2)  # (B,H,N*S)
    b = earlier.flatten(2)  # (B,H',N*S)
    dots = a @ b.transpose(1, 2)  # (B,H,H')
    norms = a.norm(dim=-1)[:, :, None] * b.norm(dim=-1)[:, None, :]  # (B,H,H')
    return (dots / norms.clamp_min(1e-30)).sum(0)


def best_permutation(similarity: torch.Tensor | np.ndarray) -> list[int]:
    """Hungarian assignment maximising total similarity: (H, H') with H <= H' -> perm, perm[h] = matched column."""
    from scipy.optimize import linear_sum_assignment

    sim = similarity.detach().cpu().double().numpy() if isinstance(similarity, torch.Tensor) else np.asarray(similarity)
    rows, cols = linear_sum_assignment(sim, maximize=True)
    perm = [0] * sim.shape[0]
    for r, c in zip(rows.tolist(), cols.tolist()):
        perm[r] = c
    return perm


def best_match(similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best column per row (not one-to-one): (H, H') -> (values (H,), indices (H,))."""
    values, indices = similarity.max(dim=1)
    return values, indices
