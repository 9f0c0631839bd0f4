"""Weight similarity of attention units across layers (the measure DirectShare matches by, SPEC §3.1, §3.4).

A *unit* is what DirectShare shares: a head for multi-head attention (H == Hkv), a KV group for GQA (its G query
heads, its K head and its V head), so shared K/V always stay with the queries that read them. Every unit of a layer
gets a flattened weight vector under a *match function*; units are compared by cosine similarity.

Notation: L layers, U units per layer (= Hkv), G = H / Hkv query heads per unit, d head dim, D hidden size.

Qwen3/Gemma3 ``q_norm``/``k_norm``: one RMSNorm weight (d,) per layer, applied to every head of that layer. It is
not part of a unit: matching compares the raw W_q/W_k/W_v/W_o slices. A norm follows shared weights only where a
whole layer's q (k) units reuse units of one layer (DirectShare's ``norms="donor"``); otherwise a shared unit runs
under its own layer's norms.
"""

from __future__ import annotations

from collections.abc import Callable

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


def same_kind_earlier(geo: Geometry) -> torch.Tensor:
    """(L, L) bool: [l, l'] is True where l' < l and both layers attend alike (same window kind, hence the same
    RoPE base in every supported family). Weight sharing matches only such layers: a unit's W_q/W_k are fitted to
    its own layer's positions, and no measurement has shown that crossing kinds is harmless."""
    kinds = geo.layer_types
    return torch.tensor([[j < i and kinds[j] == kinds[i] for j in range(geo.num_layers)]
                         for i in range(geo.num_layers)], dtype=torch.bool)


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
