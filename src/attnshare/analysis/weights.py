"""Weight similarity of attention units across layers (DirectShare's data-free matching, SPEC §3.1, §3.4).

A *unit* is what DirectShare shares: a head for multi-head attention (H == Hkv), a KV group for GQA (its G query
heads, its K head and its V head), so shared K/V always stay with the queries that read them. Every unit of a layer
gets a flattened weight vector under a *match function*; units are compared by cosine similarity.

Notation: L layers, U units per layer (= Hkv), G = H / Hkv query heads per unit, d head dim, D hidden size.

Qwen3/Gemma3 ``q_norm``/``k_norm``: one RMSNorm weight (d,) per layer, applied to every head of that layer. It is
not part of a unit: matching compares the raw W_q/W_k/W_v/W_o slices, and a shared unit keeps running under its own
layer's norms (the norms act per layer, the shared thing is the projection slices).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ArchSpec, Geometry, arch_of, attention, geometry
from ..errors import AttnshareError


def units(geo: Geometry) -> int:
    """Sharing units per layer: heads for MHA, KV groups for GQA (both equal Hkv)."""
    return geo.num_kv_heads


def unit_kind(geo: Geometry) -> str:
    return "head" if geo.group_size == 1 else "kv_group"


# ------------------------------------------------------------------------------------------- pure slicing


def unit_rows(weight: torch.Tensor, num_units: int) -> torch.Tensor:
    """Output rows of a projection split by unit: (U*r, D) -> (U, r, D), a view."""
    return weight.view(num_units, -1, weight.shape[-1])  # (U, r, D)


def unit_cols(weight: torch.Tensor, num_units: int) -> torch.Tensor:
    """Input columns of o_proj split by unit: (D, U*r) -> (U, D, r), a view."""
    return weight.view(weight.shape[0], num_units, -1).transpose(0, 1)  # (U, D, r)


# ---------------------------------------------------------------------------------------- match functions


def projection_weight(model: nn.Module, layer: int, which: str, spec: ArchSpec | None = None) -> torch.Tensor:
    """The weight of projection ``which`` ("q", "k", "v" or "o") of ``layer``, or a clear error when it is gone."""
    spec = spec or arch_of(model)
    name = getattr(spec, which)
    module = getattr(attention(model, layer), name, None)
    weight = getattr(module, "weight", None) if module is not None else None
    if not isinstance(weight, torch.Tensor) or weight.is_meta:
        raise AttnshareError(
            f"Layer {layer} has no {name} weights (another method removed them); apply weight sharing before methods "
            "that remove projections, or to a model that still has them."
        )
    return weight


def _rows_of(*which: str) -> Callable[[nn.Module, int], torch.Tensor]:
    def vectors(model: nn.Module, layer: int) -> torch.Tensor:
        num_units = units(geometry(model))
        parts = [unit_rows(projection_weight(model, layer, w), num_units).flatten(1) for w in which]  # (U, r*D) each
        return torch.cat(parts, dim=1)  # (U, n)

    vectors.__doc__ = f"Row-concat of the unit's {'/'.join(which)} slices, flattened: (U, n)."
    return vectors


def _o_columns(model: nn.Module, layer: int) -> torch.Tensor:
    """o_proj columns of the unit's G query heads, flattened: (U, D*G*d)."""
    return unit_cols(projection_weight(model, layer, "o"), units(geometry(model))).flatten(1)  # (U, n)


MATCH_FUNCTIONS: dict[str, Callable[[nn.Module, int], torch.Tensor]] = {
    "q": _rows_of("q"),
    "k": _rows_of("k"),
    "v": _rows_of("v"),
    "qk": _rows_of("q", "k"),
    "qkv": _rows_of("q", "k", "v"),
    "o": _o_columns,
}
DEFAULT_MATCH = "qk"


def check_match(match: str) -> None:
    if match not in MATCH_FUNCTIONS:
        raise AttnshareError(f"Unknown match function '{match}'; choose one of: {', '.join(MATCH_FUNCTIONS)}.")


def unit_vectors(model: nn.Module, layer: int, match: str = DEFAULT_MATCH) -> torch.Tensor:
    """Each unit's flattened weight vector of ``layer`` under ``match``: (U, n), float32, detached."""
    check_match(match)
    return MATCH_FUNCTIONS[match](model, layer).detach().float()


# ------------------------------------------------------------------------------------------ similarities


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` (m, n) with every row of ``b`` (k, n): (m, k)."""
    return F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T


def unit_similarity(model: nn.Module, layer_a: int, layer_b: int, match: str = DEFAULT_MATCH) -> torch.Tensor:
    """Cosine similarity of every unit of ``layer_a`` with every unit of ``layer_b``: (U_a, U_b)."""
    geo = geometry(model)
    for layer in (layer_a, layer_b):
        if not 0 <= layer < geo.num_layers:
            raise AttnshareError(f"Layer {layer} does not exist; the model has layers 0..{geo.num_layers - 1}.")
    return cosine_matrix(unit_vectors(model, layer_a, match), unit_vectors(model, layer_b, match))


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


def best_matches_from_vectors(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best earlier-layer match of every unit from its vectors (L, U, n): score, layer, unit, each (L, U).

    Ties go to the lowest (layer, unit), so the result is deterministic.
    """
    num_layers, num_units, _ = vectors.shape
    flat = F.normalize(vectors.float(), dim=-1).reshape(num_layers * num_units, -1)  # (L*U, n)
    score = torch.full((num_layers, num_units), float("nan"))
    layer = torch.full((num_layers, num_units), -1, dtype=torch.long)
    unit = torch.full((num_layers, num_units), -1, dtype=torch.long)
    for l in range(1, num_layers):
        sims = flat[l * num_units : (l + 1) * num_units] @ flat[: l * num_units].T  # (U, l*U)
        best, index = sims.max(dim=1)  # (U,)
        score[l], layer[l], unit[l] = best, index // num_units, index % num_units
    return score, layer, unit


def best_matches(model: nn.Module, match: str = DEFAULT_MATCH) -> WeightMatches:
    """For every unit of layer >= 1, its most similar unit (cosine) among all units of all earlier layers."""
    check_match(match)
    geo = geometry(model)
    vectors = torch.stack([unit_vectors(model, l, match) for l in range(geo.num_layers)])  # (L, U, n)
    score, layer, unit = best_matches_from_vectors(vectors)
    return WeightMatches(score, layer, unit, match, unit_kind(geo))


def match_statistics(matches: WeightMatches) -> dict[str, float]:
    """Summary of best-match scores (median, max, min, mean) and how often the match is the adjacent layer and the
    same unit index (over units of layers >= 1)."""
    num_layers, num_units = matches.score.shape
    score = matches.score[1:].flatten()  # ((L-1)*U,)
    here = torch.arange(1, num_layers).unsqueeze(1).expand(-1, num_units)  # (L-1, U) own layer
    own_unit = torch.arange(num_units).expand(num_layers - 1, -1)  # (L-1, U) own unit index
    return {
        "units": float(score.numel()),
        "median": float(score.median()),
        "mean": float(score.mean()),
        "max": float(score.max()),
        "min": float(score.min()),
        "adjacent_layer_share": float((matches.layer[1:] == here - 1).float().mean()),
        "same_unit_share": float((matches.unit[1:] == own_unit).float().mean()),
    }
