"""Cache helpers shared by evaluation and benchmarks."""

from __future__ import annotations

import torch


def tile_cache(cache, repeats: int) -> None:
    """Repeat every cached sequence ``repeats`` times along the batch, in place.

    (HF's ``batch_repeat_interleave`` skips layers whose keys have zero width, such as SA receivers' V-only slots.)
    """
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                setattr(layer, name, t.repeat_interleave(repeats, dim=0))  # (B*repeats,Hkv,S,d)
