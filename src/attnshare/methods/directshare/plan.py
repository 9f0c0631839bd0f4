"""The DirectShare plan: which (layer, unit) reuses which root unit's weights; chains resolved at planning time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...analysis.weights import check_match, units
from ...arch import Geometry
from ...errors import AttnshareError
from ...plan import Plan, check_layer
from .planner import WeightMatches

Pair = tuple[int, int, int, int]  # (layer, unit, root layer, root unit)


@dataclass
class DirectSharePlan(Plan):
    method = "directshare"

    pairs: list[Pair] = field(default_factory=list)  # sorted; every root is an unreplaced unit of an earlier layer
    match: str = "qk"
    share_o: bool = False
    ratio: float | None = None  # the ratio the planner was asked for (informational)
    select: str | None = None  # how the planner chose the pairs: "loss" or "cosine" (informational)
    # what the planner reached (informational): units replaced, units in the model, parameters the replaced units
    # free, attention parameters in the model
    reached: dict[str, int] | None = None

    def validate(self, geo: Geometry) -> None:
        check_match(self.match)
        num_units = units(geo)
        replaced = {(layer, unit) for layer, unit, _, _ in self.pairs}
        if len(replaced) != len(self.pairs):
            raise AttnshareError("The DirectShare plan replaces a unit twice; make the plan again with `attnshare plan`.")
        for layer, unit, root_layer, root_unit in self.pairs:
            check_layer(layer, geo, "replaced")
            check_layer(root_layer, geo, "root")
            if not (0 <= unit < num_units and 0 <= root_unit < num_units):
                raise AttnshareError(
                    f"The plan names unit {max(unit, root_unit)}, out of range for a model with {num_units} units per "
                    f"layer (units 0..{num_units - 1}); make the plan for this model."
                )
            if root_layer >= layer:
                raise AttnshareError(
                    f"Unit {unit} of layer {layer} cannot reuse layer {root_layer}: a root must be in an earlier layer."
                )
            if geo.layer_types[root_layer] != geo.layer_types[layer]:
                raise AttnshareError(
                    f"Unit {unit} of layer {layer} ({geo.layer_types[layer]}) cannot reuse layer {root_layer} "
                    f"({geo.layer_types[root_layer]}): weights are shared only between layers of the same attention "
                    "kind (window and RoPE base); make the plan again with `attnshare plan`."
                )
            if (root_layer, root_unit) in replaced:
                raise AttnshareError(
                    f"Unit {root_unit} of layer {root_layer} is replaced itself, so it cannot be the root of unit {unit} "
                    f"of layer {layer}; resolve chains to their roots."
                )

    @property
    def roots(self) -> dict[tuple[int, int], tuple[int, int]]:
        return {(l, u): (rl, ru) for l, u, rl, ru in self.pairs}

    @property
    def layers(self) -> list[int]:
        """Layers whose projections change: those with a replaced unit or a root."""
        return sorted({p[0] for p in self.pairs} | {p[2] for p in self.pairs})

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "match": self.match, "share_o": self.share_o, "ratio": self.ratio,
                "select": self.select, "reached": self.reached, "pairs": [list(p) for p in self.pairs]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DirectSharePlan:
        pairs = [tuple(int(x) for x in p) for p in data.get("pairs", [])]
        if any(len(p) != 4 for p in pairs):
            raise ValueError("each pair must be [layer, unit, root layer, root unit]")
        ratio, select, reached = data.get("ratio"), data.get("select"), data.get("reached")
        return cls(pairs=sorted(pairs), match=str(data.get("match", "qk")), share_o=bool(data.get("share_o", False)),
                   ratio=None if ratio is None else float(ratio), select=None if select is None else str(select),
                   reached=None if reached is None else {str(k): int(v) for k, v in reached.items()})

    def summary(self) -> str:
        chosen = f"by {self.select}" if self.select == "loss" else self.match
        share = f"{len(self.pairs)} units share ({chosen}{', +o' if self.share_o else ''})"
        return f"{self.method}: {share} across {len(self.layers)} layers{reached_text(self.reached, self.ratio)}"


def reached_text(reached: dict[str, int] | None, ratio: float | None) -> str:
    """What a plan reached next to what was asked: ``; 1/18 units = 5.6% (asked 10%), 442,368 parameters = 4.2% of
    attention``."""
    if not reached:
        return ""
    asked = "" if ratio is None else f" (asked {ratio:.1%})"
    return (f"; {reached['units']}/{reached['of']} units = {reached['units'] / reached['of']:.1%}{asked}, "
            f"{reached['params']:,} parameters = {reached['params'] / max(reached['attention'], 1):.1%} of attention")


def num_replaced(ratio: float, num_layers: int, num_units: int) -> int:
    """N = floor(ratio * L * U) (layer 0 counts in the total, as in the reference), at most (L-1) * U."""
    return min(int(ratio * num_layers * num_units + 1e-9), (num_layers - 1) * num_units)


def select_pairs(matches: WeightMatches, ratio: float) -> list[Pair]:
    """Replace the top-ranked units by best-match score and resolve every match chain to its root.

    Ranking ties go to the lower (layer, unit). A replaced unit whose match is itself replaced follows the chain
    down to the first unreplaced unit (matches always point to earlier layers, so chains end), so the result does
    not depend on the order units are visited.
    """
    num_layers, num_units = matches.score.shape
    candidates = [(l, u) for l in range(1, num_layers) for u in range(num_units)
                  if int(matches.layer[l, u]) >= 0]  # units with a match (a layer's first of its kind has none)
    ranked = sorted(candidates, key=lambda lu: (-float(matches.score[lu]), lu))
    replaced = set(ranked[: num_replaced(ratio, num_layers, num_units)])
    match = {lu: (int(matches.layer[lu]), int(matches.unit[lu])) for lu in candidates}
    return sorted((*lu, *resolve_root(lu, match, replaced)) for lu in replaced)


def resolve_root(unit: tuple[int, int], match: dict[tuple[int, int], tuple[int, int]],
                 replaced: set[tuple[int, int]]) -> tuple[int, int]:
    """Follow ``match`` from a replaced unit until an unreplaced one."""
    root = match[unit]
    while root in replaced:
        root = match[root]
    return root
