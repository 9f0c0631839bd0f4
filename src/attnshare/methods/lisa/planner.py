"""LiSA's planner: which layers become LiSA layers (the least sensitive, measured) and their head permutations."""

from __future__ import annotations

import logging

from torch import nn

from ...analysis.heads import head_maps_for
from ...arch import geometry
from ...errors import AttnshareError
from ..sa.planner import PlanProbe

log = logging.getLogger(__name__)


def lisa_count(fraction: float, num_layers: int) -> int:
    """How many LiSA layers ``fraction`` asks for; refuses fractions outside (0, 1) or with no valid choice."""
    if not 0.0 < fraction < 1.0:
        raise AttnshareError(f"The LiSA fraction must lie strictly between 0 and 1 (got {fraction}).")
    count = round(fraction * num_layers)
    if not 1 <= count <= num_layers - 1:
        raise AttnshareError(
            f"A fraction of {fraction} of {num_layers} layers gives {count} LiSA layers, but 1..{num_layers - 1} are "
            "possible (layer 0 stays standard); choose another fraction."
        )
    return count


def choose_lisa_layers(model: nn.Module, fraction: float, *, text: str = "plays", tokens: int = 1024,
                       seq_len: int = 512, heldout: int = 512, progress: bool = True) -> list[int]:
    """The ``round(fraction * L)`` layers that become LiSA layers (each reuses layer l-1), never layer 0.

    Ranked by measured sensitivity: the KL on held-out calibration tokens when the layer alone reuses its
    predecessor's attention with heads aligned (what LiSA starts from); the least sensitive layers are chosen, so
    fragile (typically shallow) layers stay standard.
    """
    geo = geometry(model)
    count = lisa_count(fraction, geo.num_layers)
    probe = PlanProbe(model, text=text, tokens=tokens, seq_len=seq_len, heldout=heldout, progress=progress)
    candidates = probe.valid_receivers([])
    if len(candidates) < count:
        raise AttnshareError(
            f"Only {len(candidates)} layers can reuse an earlier layer's attention, fewer than the {count} asked; "
            "choose a smaller fraction."
        )
    scores = probe.single_layer(candidates, aligned=True, desc="LiSA layer sensitivity")
    ranked = sorted(candidates, key=lambda layer: (scores[layer].kl, layer))
    chosen = sorted(ranked[:count])
    log.info("LiSA layers %s (KL %s)", chosen, {l: round(scores[l].kl, 4) for l in chosen})
    return chosen


def calibration_seq_len(model: nn.Module) -> int:
    """The analysis' 512-token calibration windows, shortened for models with a shorter context."""
    return min(512, getattr(model.config, "max_position_embeddings", None) or 512)


def choose_layers(model: nn.Module, fraction: float) -> list[int]:
    """LiSA layers for ``fraction`` of the model, shallow (fragile) layers kept, from measured sensitivity."""
    seq_len = calibration_seq_len(model)
    return choose_lisa_layers(model, fraction, seq_len=seq_len, heldout=seq_len)


def head_maps(model: nn.Module, donors: dict[int, int]) -> dict[int, list[int]]:
    """Best head permutation for each (receiver, donor) pair, from the head-similarity analysis."""
    return head_maps_for(model, donors, seq_len=calibration_seq_len(model))
