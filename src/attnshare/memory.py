"""Exact memory quantities read off tensors: KV-cache bytes and parameter bytes (shared tensors counted once)."""

from __future__ import annotations

from torch import nn

from .hf_compat import slot_tensors


def layer_cache_bytes(cache) -> list[int]:
    """Bytes of each cache layer's key and value tensors (zero-width K counts 0)."""
    return [sum(t.numel() * t.element_size() for t in pair if t is not None) for pair in slot_tensors(cache)]


def cache_bytes(cache) -> int:
    """Bytes held by a HF cache's key and value tensors, summed over layers (zero-width K counts 0)."""
    return sum(layer_cache_bytes(cache))


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of unique parameters (shared tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total
