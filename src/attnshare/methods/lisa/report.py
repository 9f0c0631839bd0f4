"""Exact size quantities of a LiSA model: Q+K parameters per layer, total parameters, KV-cache bytes per token."""

from __future__ import annotations

from torch import nn

from ...arch import attention, geometry
from ...hf_compat import output_cache
from ...memory import cache_bytes
from ...sharing.state import state_of
from .plan import LiSAPlan


def lisa_quantities(model: nn.Module, probe_tokens: int = 32) -> dict[str, float]:
    """Sizes of a model with one LiSA plan applied; the KV bytes are measured from a cache of ``probe_tokens``."""
    import torch

    plan = next(a.plan for a in state_of(model).applied if isinstance(a.plan, LiSAPlan))
    geo = geometry(model)
    dtype_bytes = next(model.parameters()).element_size()
    qk = geo.hidden_size * (geo.num_heads + geo.num_kv_heads) * geo.head_dim  # original q_proj + k_proj weights
    lisa = sum(p.numel() for n, p in attention(model, plan.layers[0]).named_parameters() if "lisa_" in n)
    ids = torch.zeros(1, probe_tokens, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        kv = cache_bytes(output_cache(model(ids, use_cache=True)))
    base_kv = 2 * geo.num_layers * geo.num_kv_heads * geo.head_dim * dtype_bytes * probe_tokens
    return {
        "lisa_layers": len(plan.layers),
        "num_layers": geo.num_layers,
        "rank": plan.rank,
        "qk_params_per_layer_original": qk,
        "qk_params_per_layer_lisa": lisa,
        "qk_compression": qk / lisa,
        "params": model.num_parameters(),
        "kv_bytes_per_token_base": base_kv / probe_tokens,
        "kv_bytes_per_token": kv / probe_tokens,
        "kv_ratio": kv / base_kv,
    }
