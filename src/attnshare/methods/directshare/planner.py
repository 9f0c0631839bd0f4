"""DirectShare's planner: every unit's best match among all units of earlier layers of its kind, by weight cosine.

Notation: L layers, U units per layer (heads, or KV groups under GQA), n length of a unit's weight vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...analysis.weights import DEFAULT_MATCH, check_match, same_kind_earlier, unit_kind, unit_vectors
from ...arch import geometry


@dataclass
class WeightMatches:
    """Each unit's best match among all units of all earlier layers (layer 0 has none)."""

    score: torch.Tensor  # (L, U) float: best cosine; NaN for layer 0
    layer: torch.Tensor  # (L, U) long: layer of the best match; -1 for layer 0
    unit: torch.Tensor  # (L, U) long: unit of the best match; -1 for layer 0
    match: str
    unit_kind: str  # "head" or "kv_group"

    def to_dict(self) -> dict[str, Any]:
        return {
            "match": self.match,
            "unit_kind": self.unit_kind,
            "score": [[None if math.isnan(s) else float(s) for s in row] for row in self.score.tolist()],  # NaN -> null
            "layer": self.layer.tolist(),
            "unit": self.unit.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WeightMatches:
        score = [[float("nan") if s is None else s for s in row] for row in data["score"]]
        return cls(torch.tensor(score, dtype=torch.float32), torch.tensor(data["layer"], dtype=torch.long),
                   torch.tensor(data["unit"], dtype=torch.long), data["match"], data["unit_kind"])


def earlier_similarities(flat: torch.Tensor, layer: int, num_units: int, allowed: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cosines of layer ``layer``'s units with the units of the earlier layers ``allowed[layer]`` permits (default:
    all): flat (L*U, n) normalised unit vectors -> sims (U, M) and the flat indices (M,) of those M units; None
    where no earlier layer is allowed."""
    usable = torch.ones(layer, dtype=torch.bool) if allowed is None else allowed[layer, :layer]  # (l,)
    index = torch.nonzero(usable.repeat_interleave(num_units)).flatten()  # (M,)
    if not len(index):
        return None
    return flat[layer * num_units : (layer + 1) * num_units] @ flat[index].T, index  # (U, M), (M,)


def best_matches_from_vectors(vectors: torch.Tensor, allowed: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best earlier-layer match of every unit from its vectors (L, U, n): score, layer, unit, each (L, U).

    ``allowed`` (L, L) bool limits layer l's matches to the layers l' with ``allowed[l, l']`` (default: all earlier
    layers); a layer with none keeps NaN / -1 like layer 0. Ties go to the lowest (layer, unit), so the result is
    deterministic.
    """
    num_layers, num_units, _ = vectors.shape
    flat = F.normalize(vectors.float(), dim=-1).reshape(num_layers * num_units, -1)  # (L*U, n)
    score = torch.full((num_layers, num_units), float("nan"))
    layer = torch.full((num_layers, num_units), -1, dtype=torch.long)
    unit = torch.full((num_layers, num_units), -1, dtype=torch.long)
    for l in range(1, num_layers):
        found = earlier_similarities(flat, l, num_units, allowed)
        if found is None:
            continue
        sims, index = found
        best, at = sims.max(dim=1)  # (U,)
        score[l], layer[l], unit[l] = best, index[at] // num_units, index[at] % num_units
    return score, layer, unit


def best_matches(model: nn.Module, match: str = DEFAULT_MATCH) -> WeightMatches:
    """For every unit of layer >= 1, its most similar unit (cosine) among all units of the earlier layers of its
    kind (:func:`~attnshare.analysis.weights.same_kind_earlier`)."""
    check_match(match)
    geo = geometry(model)
    vectors = torch.stack([unit_vectors(model, l, match) for l in range(geo.num_layers)])  # (L, U, n)
    score, layer, unit = best_matches_from_vectors(vectors, same_kind_earlier(geo))
    return WeightMatches(score, layer, unit, match, unit_kind(geo))


def match_statistics(matches: WeightMatches) -> dict[str, float]:
    """Summary of best-match scores (median, max, min, mean) and how often the match is the adjacent layer and the
    same unit index (over the units that have a match: layers >= 1 with an earlier layer of their kind)."""
    num_layers, num_units = matches.score.shape
    here = torch.arange(num_layers).unsqueeze(1).expand(-1, num_units)  # (L, U) own layer
    own_unit = torch.arange(num_units).expand(num_layers, -1)  # (L, U) own unit index
    has = matches.layer >= 0  # (L, U)
    score = matches.score[has]  # (M,)
    return {
        "units": float(score.numel()),
        "median": float(score.median()),
        "mean": float(score.mean()),
        "max": float(score.max()),
        "min": float(score.min()),
        "adjacent_layer_share": float((matches.layer[has] == here[has] - 1).float().mean()),
        "same_unit_share": float((matches.unit[has] == own_unit[has]).float().mean()),
    }
