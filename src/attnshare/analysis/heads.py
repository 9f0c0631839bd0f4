"""Head similarity between layers and the best head permutation it implies (SA aligned, LiSA's initialisation).

Calibration statistics use the first ``tokens`` tokens of the calibration text (``plays`` by default); the
evaluation texts (britannica, hamlet) are refused.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AttnshareError
from .collect import calibration_blocks, check_base_model
from .metrics import best_permutation
from .stats import Pair, collect_stats

DEFAULT_SKIP = 16  # query rows skipped in similarity: the first rows see few keys and are trivially similar


def head_similarity(model: nn.Module, pairs: list[Pair], *, text: str = "plays", tokens: int = 1024,
                    seq_len: int = 512, skip: int = DEFAULT_SKIP, progress: bool = False,
                    tokenizer=None) -> dict[Pair, torch.Tensor]:
    """Mean 1 - JS/ln2 between every head of the later and the earlier layer of each (earlier, later) pair: (H, H)
    indexed [later head, earlier head], streamed over calibration blocks."""
    check_base_model(model)
    blocks = calibration_blocks(model, text, tokens, seq_len, tokenizer=tokenizer)
    skip = min(skip, seq_len // 4)
    stats = collect_stats(model, blocks, head_pairs=list(pairs), layer_pairs=False, skip=skip, progress=progress)
    return {pair: stats.head_js(pair) for pair in stats.head_pairs}


def head_maps_for(model: nn.Module, donors: dict[int, int], *, text: str = "plays", tokens: int = 1024,
                  seq_len: int = 512) -> dict[int, list[int]]:
    """For each receiver r with donor d: ``maps[r][h]`` = the donor head receiver head h should use.

    The best one-to-one assignment (Hungarian) maximising head similarity 1 - JS/ln2 over calibration tokens.
    """
    if not donors:
        return {}
    pairs = [(d, r) for r, d in donors.items()]
    for d, r in pairs:
        if not d < r:
            raise AttnshareError(f"Layer {r} cannot reuse layer {d}: a donor must come before its receiver.")
    sims = head_similarity(model, pairs, text=text, tokens=tokens, seq_len=seq_len)
    return {r: best_permutation(sims[(d, r)]) for r, d in sorted(donors.items())}
