"""The byte model: the ideal cost of a decode step (bytes read) and of a prefill (FLOPs), as pure functions.

A decode step reads every weight once and the whole KV cache of every sequence; it is memory-bound, so its ideal
time is proportional to those bytes. A prefill is compute-bound: its ideal time is proportional to its FLOPs
(linear layers on every token, QK^T and PV on every causal (query, key) pair, the LM head on the last token only).
The ideal speed ratio of a variant is ``cost(base) / cost(variant)``; the measured ratio is compared with it.

Inputs are measured from a model's tensors by :func:`model_costs` (parameters, cache widths, matmul FLOPs), so the
model covers any method generically: a layer's QK^T width is the width of the keys it caches (0 for an SA receiver,
the low rank for LiSA), its PV width that of its cached values. Left out on purpose (small, or part of the gap we
want to see): activations, norms, RoPE, softmax, the donor's published probability rows, LiSA's alignment FFN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch import geometry
from ..hf_compat import new_cache, slot_tensors, with_cache
from ..memory import layer_cache_bytes


@dataclass(frozen=True)
class ModelCosts:
    """What the byte model needs to know about one model variant."""

    weight_bytes: int  # bytes one decode step reads from parameters (unique tensors; untied input embedding excluded)
    kv_bytes_per_token: tuple[int, ...]  # per layer: cache bytes one token of one sequence adds (K and V)
    windows: tuple[int | None, ...]  # per layer: sliding window (keys kept), None = full attention
    linear_flops_per_token: int  # decoder matmul FLOPs per token (2 x weight elements used), LM head excluded
    head_flops_per_token: int  # LM head FLOPs per predicted token (2 x vocab x hidden)
    score_dims: tuple[int, ...]  # per layer: H x (per-head QK^T width); 0 where the layer computes no scores
    value_dims: tuple[int, ...]  # per layer: H x (per-head value width)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def kept_keys(context: int, window: int | None) -> int:
    """Keys a layer attends at absolute length ``context`` (a sliding layer keeps at most ``window``)."""
    return context if window is None else min(context, window)


def kv_cache_bytes(kv_bytes_per_token: tuple[int, ...], windows: tuple[int | None, ...], batch: int, context: int) -> int:
    """Bytes of a KV cache holding ``context`` tokens of ``batch`` sequences."""
    return batch * sum(b * kept_keys(context, w) for b, w in zip(kv_bytes_per_token, windows))


def decode_bytes_per_step(costs: ModelCosts, batch: int, context: int) -> int:
    """Bytes one decode step reads at ``context`` cached tokens: all weights once + every sequence's KV cache."""
    return costs.weight_bytes + kv_cache_bytes(costs.kv_bytes_per_token, costs.windows, batch, context)


def decode_bytes(costs: ModelCosts, batch: int, context: int, new_tokens: int) -> int:
    """Bytes read by ``new_tokens`` decode steps after a ``context``-token prompt (step i sees context + i keys)."""
    return sum(decode_bytes_per_step(costs, batch, context + i) for i in range(new_tokens))


def causal_pairs(new: int, past: int, window: int | None = None) -> int:
    """(query, key) pairs ``new`` queries attend after ``past`` cached tokens: query i sees past + i + 1 keys."""
    return sum(kept_keys(past + i + 1, window) for i in range(new))


def attention_flops(score_dim: int, value_dim: int, pairs: int) -> int:
    """FLOPs of QK^T (2 x score_dim per pair) and PV (2 x value_dim per pair) for one sequence."""
    return 2 * pairs * (score_dim + value_dim)


def prefill_flops(costs: ModelCosts, batch: int, tokens: int) -> int:
    """FLOPs of a prefill of ``tokens`` tokens per sequence, logits for the last token only (as generate does)."""
    attn = sum(
        attention_flops(s, v, causal_pairs(tokens, 0, w))
        for s, v, w in zip(costs.score_dims, costs.value_dims, costs.windows)
    )
    return batch * (tokens * costs.linear_flops_per_token + costs.head_flops_per_token + attn)


def ideal_ratio(base_cost: float, variant_cost: float) -> float:
    """Ideal speed-up of a variant over the base: the cost that is gone is time saved, nothing else changes."""
    return base_cost / variant_cost


def max_batch_under_budget(costs: ModelCosts, param_bytes: int, tokens_per_sequence: int, budget_bytes: int) -> int:
    """The largest batch whose parameters + KV cache (at ``tokens_per_sequence``) fit in ``budget_bytes``; 0 if none."""
    per_sequence = kv_cache_bytes(costs.kv_bytes_per_token, costs.windows, 1, tokens_per_sequence)
    free = budget_bytes - param_bytes
    return max(free // per_sequence, 0) if per_sequence else 0


# ---- measuring the inputs from a model -------------------------------------------------------------------------


def decode_weight_bytes(model: nn.Module) -> int:
    """Unique parameter bytes a decode step reads; an untied input embedding is only gathered (B rows), so skipped."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    seen, total = set(), 0
    for p in model.parameters():
        ptr = p.data_ptr()
        if ptr in seen or (ptr == embed.data_ptr() and not tied):
            continue
        seen.add(ptr)
        total += p.numel() * p.element_size()
    return total


def cache_widths(cache) -> list[tuple[int, int, int]]:
    """Per layer of a HF cache: (kv heads, key width, value width) read from its tensors' shapes."""
    out = []
    for k, v in slot_tensors(cache):  # (B,Hkv,S,dk), (B,Hkv,S,dv)
        out.append((v.shape[1], k.shape[-1], v.shape[-1]))
    return out


def _matmul_flops(model: nn.Module, ids: torch.Tensor) -> int:
    """FLOPs of the 2-D matmuls (linear layers) in a no-cache forward of ``ids``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(ids, use_cache=False)
    linear_ops = (torch.ops.aten.mm, torch.ops.aten.addmm)
    return int(sum(n for op, n in counter.get_flop_counts().get("Global", {}).items() if op in linear_ops))


def model_costs(model: nn.Module) -> ModelCosts:
    """Measure the byte model's inputs on ``model``: weights, per-layer cache bytes and widths, matmul FLOPs."""
    geo = geometry(model)
    device = next(model.parameters()).device
    tokens = 2  # fewer than any sliding window, so every layer keeps every token
    ids = torch.zeros(1, tokens, dtype=torch.long, device=device)
    cache = new_cache(model)
    with torch.no_grad():
        model(ids, **with_cache(model, cache), use_cache=True)
    per_token = tuple(b // tokens for b in layer_cache_bytes(cache))
    widths = cache_widths(cache)
    config = getattr(model.config, "text_config", None) or model.config
    window = getattr(config, "sliding_window", None)
    windows = tuple(window if kind == "sliding_attention" else None for kind in geo.layer_types)
    head = model.get_output_embeddings().weight  # (V, D)
    head_flops = 2 * head.shape[0] * head.shape[1]
    linear = _matmul_flops(model, ids[:, :1]) - head_flops
    return ModelCosts(
        weight_bytes=decode_weight_bytes(model),
        kv_bytes_per_token=per_token,
        windows=windows,
        linear_flops_per_token=linear,
        head_flops_per_token=head_flops,
        score_dims=tuple(geo.num_heads * dk for _, dk, _ in widths),
        value_dims=tuple(geo.num_heads * dv for _, _, dv in widths),
    )
