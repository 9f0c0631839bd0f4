"""Parity helpers shared by the method tests."""

from __future__ import annotations

import torch


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def greedy_no_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Step-by-step argmax decoding, re-running the full sequence each step without a cache."""
    out = ids
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(out, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
    return out


def greedy_generate(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            pad_token_id=0, eos_token_id=None,
        )


def random_ids(batch: int, length: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
