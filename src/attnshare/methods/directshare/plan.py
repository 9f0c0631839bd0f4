"""The DirectShare plan: which (layer, unit) reuses which root unit's weights; chains resolved at planning time."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from ...analysis.weights import check_match
from ...arch import NORM_NAMES, ArchSpec, Geometry, arch_of, attention, geometry
from ...errors import AttnshareError
from ...plan import Plan, check_layer
from .planner import WeightMatches

Pair = tuple[int, int, int, int]  # (layer, unit, root layer, root unit)


@dataclass(frozen=True)
class Part:
    """What one kind of unit shares: the unit slices of ``kinds`` (o's columns join the part holding q when the plan
    shares o), with ``per_query_head`` units per layer (H) or one per KV head (Hkv: a KV group under GQA)."""

    name: str
    kinds: tuple[str, ...]
    per_query_head: bool = False
    noun: str = "units"  # what messages call its units
    plan_field: str = "pairs"  # the plan field that lists its pairs

    def units(self, geo: Geometry) -> int:
        return geo.num_heads if self.per_query_head else geo.num_kv_heads

    def shares(self, kind: str) -> bool:
        return kind in self.kinds or (kind == "o" and "q" in self.kinds)


GROUP = Part("group", ("q", "k", "v"))  # a KV group: its G query heads' W_q rows and its W_k/W_v rows, together
# one query head's W_q rows
QUERY = Part("query", ("q",), per_query_head=True, noun="query-head units", plan_field="q_pairs")
KV = Part("kv", ("k", "v"), noun="KV-head units")  # one KV head's W_k/W_v rows
GRANULARITIES: dict[str, tuple[Part, ...]] = {"group": (GROUP,), "split": (KV, QUERY)}  # the plan's pair lists, in order
NORM_RULES = ("donor", "own")  # whose q_norm/k_norm a layer runs when all its q (k) units reuse one earlier layer
NORM_OF = dict(zip(("q", "k"), NORM_NAMES))  # the per-layer norm that follows each projection kind's units


@dataclass
class DirectSharePlan(Plan):
    method = "directshare"

    pairs: list[Pair] = field(default_factory=list)  # sorted; every root is an unreplaced unit of an earlier layer
    match: str = "qk"
    granularity: str = "group"  # "group": pairs are KV-group units; "split": pairs are KV heads, q_pairs query heads
    q_pairs: list[Pair] = field(default_factory=list)  # "split" only: query heads reusing an earlier query head's W_q
    share_o: bool = False
    ratio: float | None = None  # the ratio the planner was asked for (informational)
    select: str | None = None  # how the planner chose the pairs: "loss" or "cosine" (informational)
    # what the planner reached (informational): units replaced, units in the model, parameters the replaced units
    # free, attention parameters in the model
    reached: dict[str, int] | None = None
    # q/k norms (per head, Qwen3/Gemma3) of a layer whose every q (k) unit reuses units of one earlier layer: "donor"
    # (that layer's norm, stored once) or "own"; plans saved before this field read as "own", what they were built with
    norms: str = "own"

    def validate(self, geo: Geometry) -> None:
        check_match(self.match)
        check_norms(self.norms)
        if self.granularity not in GRANULARITIES:
            raise AttnshareError(f"Unknown DirectShare granularity {self.granularity!r}; the plan must name one of "
                                 f"{', '.join(GRANULARITIES)}.")
        if self.granularity == "group" and self.q_pairs:
            raise AttnshareError("A DirectShare plan of KV-group units has no query-head pairs; make the plan again "
                                 "with `attnshare plan`.")
        for part, pairs in self.parts():
            check_pairs(part, pairs, geo)

    def parts(self) -> list[tuple[Part, list[Pair]]]:
        """Each kind of unit the plan shares, with its pairs."""
        return [(part, getattr(self, part.plan_field)) for part in GRANULARITIES[self.granularity]]

    def part_of(self, kind: str) -> Part:
        """The part that shares projection ``kind`` (q, k, v, or o with share_o)."""
        return next(part for part in GRANULARITIES[self.granularity] if part.shares(kind))

    @property
    def num_pairs(self) -> int:
        return len(self.pairs) + len(self.q_pairs)

    def roots_of(self, part: Part) -> dict[tuple[int, int], tuple[int, int]]:
        return {(l, u): (rl, ru) for l, u, rl, ru in dict(self.parts())[part]}

    def norm_lenders(self, geo: Geometry) -> dict[tuple[str, int], int]:
        """(norm name, layer) -> the earlier layer whose norm it runs (``norms="donor"``): layers whose every unit of
        the part holding q (for q_norm) or k (for k_norm) reuses a unit of that one layer. Lenders are unreplaced."""
        if self.norms != "donor":
            return {}
        out = {}
        for kind, name in NORM_OF.items():
            part = self.part_of(kind)
            for layer, lender in lenders(self.roots_of(part), part.units(geo)).items():
                out[name, layer] = lender
        return out

    @property
    def layers(self) -> list[int]:
        """Layers whose projections change: those with a replaced unit or a root."""
        pairs = self.pairs + self.q_pairs
        return sorted({p[0] for p in pairs} | {p[2] for p in pairs})

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "match": self.match, "share_o": self.share_o, "ratio": self.ratio,
               "select": self.select, "reached": self.reached, "pairs": [list(p) for p in self.pairs]}
        if self.granularity != "group":  # plans of KV-group units read as before
            out.update(granularity=self.granularity, q_pairs=[list(p) for p in self.q_pairs])
        if self.norms != "own":
            out["norms"] = self.norms
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DirectSharePlan:
        pairs, q_pairs = (read_pairs(data.get(key, [])) for key in ("pairs", "q_pairs"))
        ratio, select, reached = data.get("ratio"), data.get("select"), data.get("reached")
        return cls(pairs=pairs, match=str(data.get("match", "qk")), share_o=bool(data.get("share_o", False)),
                   granularity=str(data.get("granularity", "group")), q_pairs=q_pairs,
                   ratio=None if ratio is None else float(ratio), select=None if select is None else str(select),
                   reached=None if reached is None else {str(k): int(v) for k, v in reached.items()},
                   norms=str(data.get("norms", "own")))

    @staticmethod
    def lists(granularity: str, shared: dict[str, list[Pair]]) -> dict[str, list[Pair]]:
        """The plan fields (``pairs``, ``q_pairs``) of a plan of ``granularity``, from its pairs by part name."""
        return {"pairs": [], "q_pairs": [],
                **{part.plan_field: shared.get(part.name, []) for part in GRANULARITIES[granularity]}}

    def base_fields(self) -> dict[str, Any]:
        """The DirectShare fields, for a subclass's plan built from this one."""
        return {f.name: getattr(self, f.name) for f in fields(DirectSharePlan)}

    def summary(self) -> str:
        chosen = f"by {self.select}" if self.select == "loss" else self.match
        units = (f"{len(self.pairs)} units" if self.granularity == "group" else
                 f"{len(self.pairs)} KV heads + {len(self.q_pairs)} query heads")
        share = f"{units} share ({chosen}{', +o' if self.share_o else ''})"
        borrowed = (self.reached or {}).get("norms", 0)
        norms = f"; {borrowed} q/k norms run their donor layer's" if borrowed else ""
        return (f"{self.method}: {share} across {len(self.layers)} layers{reached_text(self.reached, self.ratio)}"
                f"{norms}")


def norms_can_travel(spec: ArchSpec) -> bool:
    """Per-head q/k norms (width d, one per layer) can follow another layer's units; a norm over the whole projection
    (OLMo-2) is tied to its layer's head order and stays."""
    return spec.qk_norm_scope == "head"


def check_norms(norms: str) -> None:
    if norms not in NORM_RULES:
        raise AttnshareError(f"--norms must be {' or '.join(NORM_RULES)}, got {norms!r}.")


def lenders(roots: dict[tuple[int, int], tuple[int, int]], num_units: int) -> dict[int, int]:
    """Layer -> lender for every layer all of whose ``num_units`` units map (in ``roots``: (layer, unit) -> (root
    layer, root unit)) to units of one other layer; ``{(5, 0): (2, 1), (5, 1): (2, 0)}`` with 2 units -> {5: 2}."""
    by_layer: dict[int, set[int]] = {}
    counts: dict[int, int] = {}
    for (layer, _), (root_layer, _) in roots.items():
        by_layer.setdefault(layer, set()).add(root_layer)
        counts[layer] = counts.get(layer, 0) + 1
    return {layer: next(iter(found)) for layer, found in sorted(by_layer.items())
            if counts[layer] == num_units and len(found) == 1}


def reached_text(reached: dict[str, int] | None, ratio: float | None) -> str:
    """What a plan reached next to what was asked: ``; 1/18 units = 5.6% (asked 10%), 442,368 parameters = 4.2% of
    attention``. Units of unequal size (split) state the asked fraction against the shared kinds' parameters
    (``shareable``): ``; 14/90 units, 1,658,880 parameters = 10.0% of q/k/v (asked 10.0%), 8.3% of attention``."""
    if not reached:
        return ""
    asked = "" if ratio is None else f" (asked {ratio:.1%})"
    of_attention = f"{reached['params'] / max(reached['attention'], 1):.1%} of attention"
    if "shareable" in reached:
        return (f"; {reached['units']}/{reached['of']} units, {reached['params']:,} parameters = "
                f"{reached['params'] / max(reached['shareable'], 1):.1%} of q/k/v{asked}, {of_attention}")
    return (f"; {reached['units']}/{reached['of']} units = {reached['units'] / reached['of']:.1%}{asked}, "
            f"{reached['params']:,} parameters = {of_attention}")


def read_pairs(rows: list) -> list[Pair]:
    pairs = [tuple(int(x) for x in p) for p in rows]
    if any(len(p) != 4 for p in pairs):
        raise ValueError("each pair must be [layer, unit, root layer, root unit]")
    return sorted(pairs)


def check_pairs(part: Part, pairs: list[Pair], geo: Geometry) -> None:
    """One clear sentence for the first pair of ``part`` a model with ``geo`` cannot share."""
    num_units = part.units(geo)
    replaced = {(layer, unit) for layer, unit, _, _ in pairs}
    if len(replaced) != len(pairs):
        raise AttnshareError("The DirectShare plan replaces a unit twice; make the plan again with `attnshare plan`.")
    for layer, unit, root_layer, root_unit in pairs:
        check_layer(layer, geo, "replaced")
        check_layer(root_layer, geo, "root")
        if not (0 <= unit < num_units and 0 <= root_unit < num_units):
            raise AttnshareError(
                f"The plan names unit {max(unit, root_unit)}, out of range for a model with {num_units} {part.noun} "
                f"per layer (units 0..{num_units - 1}); make the plan for this model."
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


def part_kinds(part: Part, share_o: bool) -> tuple[str, ...]:
    """The projections a ``part`` unit's slices come from: its kinds, and o with ``share_o`` if it holds q."""
    return tuple(k for k in ("q", "k", "v", "o") if part.shares(k) and (share_o or k != "o"))


def part_parameters(model: nn.Module, part: Part, share_o: bool = False) -> int:
    """Parameters one replaced ``part`` unit frees (read off layer 0): its rows and biases of each projection kind it
    shares (o: columns only; o's bias belongs to the layer)."""
    spec, attn = arch_of(model), attention(model, 0)
    total = 0
    for kind in part_kinds(part, share_o):
        module = getattr(attn, getattr(spec, kind))
        total += module.weight.numel() + (module.bias.numel() if module.bias is not None and kind != "o" else 0)
    return total // part.units(geometry(model))


def grains(sizes: dict[Part, int], geo: Geometry) -> tuple[int, int]:
    """The budget's grain (the gcd of the unit sizes, in parameters) and the grains in one layer."""
    grain = math.gcd(*sizes.values())
    return grain, sum(part.units(geo) * size // grain for part, size in sizes.items())


def replaced_budget(ratio: float, geo: Geometry, sizes: dict[Part, int]) -> int:
    """Parameters a plan of ``ratio`` frees, ``sizes`` (Part -> parameters of one unit) the parts it shares:
    ``ratio`` of all the parts' slices, in whole grains (grain = the gcd of the unit sizes), at most every layer but
    the first. With one part (KV-group units) that is exactly :func:`num_replaced` units."""
    grain, per_layer = grains(sizes, geo)
    return grain * min(int(ratio * geo.num_layers * per_layer + 1e-9), (geo.num_layers - 1) * per_layer)


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
