"""Sensitivity: how much the next-token distribution moves when a sharing plan is applied.

Plans are applied with :func:`attnshare.sharing.apply.apply` (``keep_originals=True``, so undoing needs no reload) and undone
after each measurement; the reference log-probabilities of the unshared model are computed once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..plan import Plan
from ..sharing.apply import apply, unapply


@dataclass
class Divergence:
    """KL(base || shared) of next-token distributions (nats, mean over tokens) and the shared model's ppl."""

    kl: float
    ppl: float


def forward_logprobs(model: nn.Module, blocks: torch.Tensor) -> list[torch.Tensor]:
    """Next-token log-probabilities per block: blocks (N, T) -> N tensors (T-1, V) in float32."""
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for ids in blocks:
            logits = model(ids[None].to(device), use_cache=False).logits[0, :-1].float()  # (T-1, V)
            out.append(F.log_softmax(logits, dim=-1).cpu())
    return out


def divergence(model: nn.Module, blocks: torch.Tensor, reference: list[torch.Tensor]) -> Divergence:
    """KL from ``reference`` (the base model's log-probs on ``blocks``) to ``model``'s, and ``model``'s ppl."""
    device = next(model.parameters()).device
    kl, nll, count = 0.0, 0.0, 0
    with torch.inference_mode():
        for ids, ref in zip(blocks, reference):
            logits = model(ids[None].to(device), use_cache=False).logits[0, :-1].float()  # (T-1, V)
            logp = F.log_softmax(logits, dim=-1).cpu()
            kl += F.kl_div(logp, ref, log_target=True, reduction="sum").item()  # Σ_t Σ_v p_ref (log p_ref - log p)
            nll += F.nll_loss(logp, ids[1:], reduction="sum").item()
            count += ids.numel() - 1
    return Divergence(kl / count, math.exp(nll / count))


def plan_divergence(model: nn.Module, plan: Plan, blocks: torch.Tensor, reference: list[torch.Tensor]) -> Divergence:
    """Apply ``plan`` to the (base) ``model``, measure :func:`divergence`, and undo it (the model ends unchanged)."""
    apply(model, plan, keep_originals=True)
    try:
        return divergence(model, blocks, reference)
    finally:
        unapply(model)
