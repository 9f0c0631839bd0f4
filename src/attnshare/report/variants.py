"""Measure a shared variant against its base model: perplexity, parameters and KV-cache bytes (exact quantities).

Used by ``attnshare sweep`` and the demo, so every table row is measured the same way.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..api import applied_plans, apply
from ..evaluate.perplexity import PerplexityConfig, perplexity
from ..evaluate.proxies import score_proxies
from ..hf_compat import output_cache
from ..memory import cache_bytes

PROBE_TOKENS = 8  # tokens of the short forward whose cache is measured


def kv_bytes_per_token(model: nn.Module) -> float:
    """KV-cache bytes per token of one sequence, measured from the cache tensors of a short forward."""
    ids = torch.zeros(1, PROBE_TOKENS, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        return cache_bytes(output_cache(model(ids, use_cache=True))) / PROBE_TOKENS


@dataclass
class Baseline:
    """The base model's numbers every variant is compared with."""

    ppl: float
    params: int
    kv_per_token: float
    proxies: dict[str, float] = field(default_factory=dict)  # proxy task -> accuracy


@dataclass
class VariantRow:
    """One variant: what it costs in quality and what it saves, relative to the base model."""

    name: str
    method: str
    plan: str
    ppl: float
    ppl_ratio: float
    params: int
    params_saved: float  # fraction of the base model's parameters
    kv_per_token: float  # bytes per token of one sequence
    kv_saved: float  # fraction of the base model's KV cache
    notes: str = ""
    proxies: dict[str, float] = field(default_factory=dict)  # proxy task -> accuracy (same items as the base)

    def to_dict(self) -> dict:
        return asdict(self)


def proxy_accuracies(model: nn.Module, tokenizer, proxy_items: dict[str, list] | None, progress: bool) -> dict:
    """Accuracy per proxy task on prepared items (see :func:`attnshare.evaluate.proxies.make_proxy_items`)."""
    if not proxy_items:
        return {}
    return {name: res["accuracy"] for name, res in score_proxies(model, tokenizer, proxy_items, progress=progress).items()}


def baseline(model: nn.Module, tokenizer, ppl_config: PerplexityConfig, progress: bool = True,
             proxy_items: dict[str, list] | None = None) -> Baseline:
    return Baseline(perplexity(model, tokenizer, ppl_config, progress).ppl, model.num_parameters(),
                    kv_bytes_per_token(model), proxy_accuracies(model, tokenizer, proxy_items, progress))


def measure(model: nn.Module, tokenizer, ppl_config: PerplexityConfig, base: Baseline, *, name: str, method: str,
            notes: str = "", progress: bool = True, proxy_items: dict[str, list] | None = None) -> VariantRow:
    """Measure an already-shared ``model`` against ``base`` (proxies scored on the same items as the base)."""
    ppl = perplexity(model, tokenizer, ppl_config, progress).ppl
    params, kv = model.num_parameters(), kv_bytes_per_token(model)
    return VariantRow(
        name=name, method=method, plan="; ".join(p.summary() for p in applied_plans(model)), ppl=ppl,
        ppl_ratio=ppl / base.ppl, params=params, params_saved=1 - params / base.params, kv_per_token=kv,
        kv_saved=1 - kv / base.kv_per_token, notes=notes,
        proxies=proxy_accuracies(model, tokenizer, proxy_items, progress),
    )


def measure_plans(base_model: nn.Module, tokenizer, plans, ppl_config: PerplexityConfig, base: Baseline, *,
                  name: str, method: str, notes: str = "", progress: bool = True,
                  proxy_items: dict[str, list] | None = None) -> VariantRow:
    """Apply ``plans`` to a copy of ``base_model`` (the base stays untouched) and measure it."""
    shared = apply(copy.deepcopy(base_model), plans)
    try:
        return measure(shared, tokenizer, ppl_config, base, name=name, method=method, notes=notes, progress=progress,
                       proxy_items=proxy_items)
    finally:
        del shared
