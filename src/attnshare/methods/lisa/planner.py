"""LiSA's planner: which layers become LiSA layers (the least sensitive, measured) and their head permutations."""

from __future__ import annotations

import logging

from torch import nn

from ...analysis.collect import CalibrationConfig
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


def calibration_seq_len(model: nn.Module, config: CalibrationConfig) -> int:
    """The config's calibration windows (512 tokens by default), shortened for models with a shorter context."""
    return min(config.calib_seq_len, getattr(model.config, "max_position_embeddings", None) or config.calib_seq_len)


def choose_lisa_layers(model: nn.Module, fraction: float, config: CalibrationConfig, *,
                       progress: bool = True) -> tuple[list[int], PlanProbe]:
    """The ``round(fraction * L)`` layers that become LiSA layers (each reuses layer l-1), never layer 0, and the
    probe that measured them (it keeps the head maps it computed).

    Ranked by measured sensitivity: the KL on ``config``'s held-out calibration tokens when the layer alone reuses its
    predecessor's attention with heads aligned (what LiSA starts from); the least sensitive layers are chosen, so
    fragile (typically shallow) layers stay standard.
    """
    count = lisa_count(fraction, geometry(model).num_layers)
    probe = PlanProbe.of(model, config, progress, seq_len=calibration_seq_len(model, config))
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
    return chosen, probe


def head_maps(model: nn.Module, donors: dict[int, int], config: CalibrationConfig,
              probe: PlanProbe | None = None) -> dict[int, list[int]]:
    """Best head permutation for each (receiver, donor) pair from the head similarity on ``config``'s calibration
    tokens; a probe reuses the pairs it already measured."""
    if probe is not None:
        return probe.head_maps(donors)
    return head_maps_for(model, donors, text=config.calib_text, tokens=config.calib_tokens,
                         seq_len=calibration_seq_len(model, config))
