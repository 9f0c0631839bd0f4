"""Where LiSA's plan comes from: the analysis (sensitivity, head permutations), with a stand-in if it is absent."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ...arch import geometry

log = logging.getLogger(__name__)


def choose_layers(model: nn.Module, fraction: float) -> list[int]:
    """LiSA layers for ``fraction`` of the model, shallow (fragile) layers kept, from the sensitivity analysis."""
    try:
        from ...analysis.planning import choose_lisa_layers
    except ImportError:
        return deepest_layers(geometry(model).num_layers, fraction)
    seq_len = calibration_seq_len(model)
    return sorted(choose_lisa_layers(model, fraction, seq_len=seq_len, heldout=seq_len))


def head_maps(model: nn.Module, donors: dict[int, int]) -> dict[int, list[int]]:
    """Best head permutation for each (receiver, donor) pair, from the head-similarity analysis."""
    try:
        from ...analysis.planning import head_maps_for
    except ImportError:
        return adjacent_head_maps(model, donors)
    return head_maps_for(model, donors, seq_len=calibration_seq_len(model))


def calibration_seq_len(model: nn.Module) -> int:
    """The analysis' 512-token calibration windows, shortened for models with a shorter context."""
    return min(512, getattr(model.config, "max_position_embeddings", None) or 512)


def deepest_layers(num_layers: int, fraction: float) -> list[int]:
    """Stand-in layer choice: the last round(fraction * L) layers (never layer 0)."""
    count = min(num_layers - 1, max(1, round(fraction * num_layers)))
    log.warning("analysis.planning is not available: using the deepest %d layers as LiSA layers", count)
    return list(range(num_layers - count, num_layers))


def js_similarity(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """1 - JS/ln2 between every head of p and every head of q, mean over rows.

    p (Hp,T,S), q (Hq,T,S) rows summing to 1 -> (Hp,Hq).
    """
    p, q = p[:, None], q[None]  # (Hp,1,T,S), (1,Hq,T,S)
    m = 0.5 * (p + q)
    js = 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1) + 0.5 * (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return 1.0 - js.mean(-1) / torch.log(torch.tensor(2.0))


def adjacent_head_maps(model: nn.Module, donors: dict[int, int], tokens: int = 256,
                       skip_rows: int = 16) -> dict[int, list[int]]:
    """Stand-in head maps: Hungarian assignment on 1 - JS/ln2 of one calibration window of the plays."""
    import copy

    from scipy.optimize import linear_sum_assignment

    log.warning("analysis.planning is not available: estimating head maps from %d tokens", tokens)
    probe = copy.deepcopy(model)
    probe.set_attn_implementation("eager")
    ids = calibration_ids(model, tokens)  # (1, tokens)
    with torch.no_grad():
        maps = probe(ids, use_cache=False, output_attentions=True).attentions  # L x (1,H,T,T)
    out = {}
    for receiver, donor in donors.items():
        sim = js_similarity(maps[receiver][0, :, skip_rows:].float(), maps[donor][0, :, skip_rows:].float())
        rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
        out[receiver] = [int(c) for _, c in sorted(zip(rows, cols))]
    return out


def calibration_ids(model: nn.Module, tokens: int) -> torch.Tensor:
    """(1, tokens) ids of the plays for the model's tokenizer; seeded random ids for a model without one."""
    from ...data import load_text, tokenize_text
    from ...errors import AttnshareError
    from ...models import load_model, model_identity

    try:
        _, tokenizer = load_model(model_identity(model)["base_model"])
        return tokenize_text(tokenizer, load_text("plays")[: 20 * tokens], tokens).view(1, -1)
    except (AttnshareError, OSError, ValueError):
        vocab = model.get_input_embeddings().weight.shape[0]
        return torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
