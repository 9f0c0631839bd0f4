"""Exact memory quantities measured from tensors: KV-cache bytes and parameter bytes."""

from __future__ import annotations

import torch
from torch import nn


def cache_bytes(cache) -> int:
    """Bytes held by a HF cache's key and value tensors, summed over layers (zero-width K counts 0)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of unique parameters (shared tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total
