"""DirectShare's measured planner (``select="loss"``): units and donors chosen by what sharing does to the model on
held-out calibration tokens, not by weight cosine (best-match cosines are about 0.01 on SmolLM2 and rank donors no
better than chance; see docs/results/directshare.md).

Two measurements, both on held-out calibration tokens (the ``loss_tokens`` tokens that follow the first
:data:`HELDOUT_OFFSET` tokens of the calibration text, the tokens SA, LiSA and the analysis measure KL on):

1. **donors, locally** -- for every unit (l, u) of a layer l >= 1 and every candidate donor (l' < l, u'), the
   relative change of layer l's attention output when the unit's W_q/W_k/W_v slices (and biases; W_o columns with
   ``share_o``) are replaced by the donor's, on layer l's own captured inputs (the first :data:`LOCAL_TOKENS` of
   each block): ``||out' - out||^2 / ||out||^2``.
   One attention-module call per (unit, donor), no full forward.
2. **units, end to end** -- every unit replaced alone by its best local donor: KL(base || shared) of the
   next-token distributions (:meth:`PlanProbe.measure`, one forward each).

A plan of N units replaces the N units of lowest single-unit KL (with ``greedy = w > 0``: greedy forward selection,
each step the best of the next w units of that ranking on the measured KL of the whole plan), each reusing its best
local donor among the units that stay unreplaced, so a plan has no chains.

Notation: L layers, U units per layer, N held-out blocks of T tokens, D hidden size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ...analysis.weights import projection_weight, same_kind_earlier, unit_cols, unit_rows, unit_vectors, units
from ...arch import ArchSpec, arch_of, attention, geometry
from ...progress import progress_bar
from ..sa.planner import PlanProbe
from .config import DirectShareConfig
from .plan import (
    GRANULARITIES,
    GROUP,
    NORM_OF,
    DirectSharePlan,
    Pair,
    Part,
    lenders,
    norms_can_travel,
    part_kinds,
    part_parameters,
    replaced_budget,
)
from .planner import earlier_similarities

log = logging.getLogger(__name__)

Unit = tuple[int, int]  # (layer, unit)
Key = tuple[str, int, int]  # (part name, layer, unit)

HELDOUT_OFFSET = 1024  # held-out tokens follow the first 1024 calibration tokens (as for SA, LiSA, the analysis)
SEQ_LEN = 256  # tokens per held-out block (shorter for models with a shorter context)
LOCAL_TOKENS = 128  # the local donor search reads the first 128 tokens of each block (measured: 2.6x faster than
# 256 on SmolLM2, its picks within a few percent of the 256-token best; docs/results/directshare.md)


# ------------------------------------------------------------------------------------------------ pure helpers


def relative_change(out: torch.Tensor, base: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """``||out - base||^2 / scale`` over all elements, ``scale`` defaulting to ``||base||^2``; out, base (N, T, D)."""
    scale = base.float().pow(2).sum() if scale is None else scale
    return float((out.float() - base.float()).pow(2).sum() / scale.clamp_min(1e-30))


def lowest(costs: dict[Unit, float], count: int | None = None) -> list[Unit]:
    """Units by increasing cost, ties to the lower (layer, unit); the first ``count`` (all when None)."""
    ranked = sorted(costs, key=lambda unit: (costs[unit], unit))
    return ranked if count is None else ranked[:count]


def donor_order(local: dict[Unit, dict[Unit, float]], fallback: dict[Unit, list[Unit]]) -> dict[Unit, list[Unit]]:
    """Each unit's donors, best (lowest local change) first, then the unmeasured ones in ``fallback`` order."""
    out = {}
    for unit, costs in local.items():
        measured = lowest(costs)
        out[unit] = measured + [d for d in fallback[unit] if d not in costs]
    return out


def assign_donors(chosen: list[Unit], order: dict[Unit, list[Unit]]) -> list[Pair]:
    """Each chosen unit reuses its first donor in ``order`` that stays unreplaced: sorted pairs, no chains.

    Every order holds all units of the first layer of its kind, which has no donor and is never replaced, so a
    donor always exists."""
    replaced = set(chosen)
    return sorted((*unit, *next(d for d in order[unit] if d not in replaced)) for unit in chosen)


def cosine_order(vectors: torch.Tensor, allowed: torch.Tensor | None = None) -> dict[Unit, list[Unit]]:
    """Every unit's earlier units by decreasing weight cosine, ties to the lower (layer, unit); vectors (L, U, n).

    ``allowed`` (L, L) bool limits layer l's donors to the layers l' with ``allowed[l, l']`` (default: all earlier
    layers); a layer with none has no entry (its units cannot be replaced)."""
    num_layers, num_units, _ = vectors.shape
    flat = torch.nn.functional.normalize(vectors.float(), dim=-1).reshape(num_layers * num_units, -1)  # (L*U, n)
    out: dict[Unit, list[Unit]] = {}
    for layer in range(1, num_layers):
        found = earlier_similarities(flat, layer, num_units, allowed)
        if found is None:
            continue
        sims, index = found  # (U, M), (M,)
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices  # (U, M)
        for unit in range(num_units):
            out[(layer, unit)] = [divmod(int(index[i]), num_units) for i in order[unit]]
    return out


# ----------------------------------------------------------------------------------- local donor measurement


def attention_inputs(model: nn.Module, blocks: torch.Tensor) -> dict[int, tuple[tuple, dict]]:
    """The positional and keyword inputs of every layer's attention module on one forward of ``blocks`` (N, T)."""
    geo = geometry(model)
    captured: dict[int, tuple[tuple, dict]] = {}
    hooks = [attention(model, layer).register_forward_pre_hook(
        lambda module, args, kwargs, layer=layer: captured.__setitem__(layer, (args, dict(kwargs))), with_kwargs=True)
        for layer in range(geo.num_layers)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(blocks.to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def unit_tensors(model: nn.Module, unit: Unit, kinds: tuple[str, ...], spec: ArchSpec,
                 num_units: int | None = None) -> list[torch.Tensor]:
    """Views of one unit's slices, the layer split into ``num_units`` units (default: one per KV head): q/k/v rows
    (r, D), their biases (r,), o columns (D, r) when "o" is in kinds."""
    layer, index = unit
    num_units = num_units or units(geometry(model))
    out = []
    for kind in kinds:
        weight = projection_weight(model, layer, kind, spec)
        if kind == "o":
            out.append(unit_cols(weight, num_units)[index])  # (D, r)
            continue
        out.append(unit_rows(weight, num_units)[index])  # (r, D)
        bias = getattr(getattr(attention(model, layer), getattr(spec, kind)), "bias", None)
        if bias is not None:
            out.append(bias.view(num_units, -1)[index])  # (r,)
    return out


def lent_norms(model: nn.Module, assign: dict[Unit, Unit], kinds: tuple[str, ...], spec: ArchSpec,
               num_units: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(borrower's, lender's) q/k norm weights that a plan with ``norms="donor"`` moves (what
    :meth:`DirectSharePlan.norm_lenders` gives, for the norms of ``kinds``): per-head norms of layers whose every
    unit in ``assign`` reuses units of one layer."""
    if not norms_can_travel(spec):
        return []
    names = [NORM_OF[k] for k in kinds if k in NORM_OF]
    return [(getattr(attention(model, layer), name).weight, getattr(attention(model, lender), name).weight)
            for layer, lender in lenders(assign, num_units).items() for name in names]


@contextmanager
def units_replaced(model: nn.Module, assign: dict[Unit, Unit], kinds: tuple[str, ...], spec: ArchSpec,
                   num_units: int | None = None, norms: str = "own") -> Iterator[None]:
    """While active, every unit of ``assign`` holds its donor's slices (written in place, restored on exit), and
    with ``norms="donor"`` a layer whose units all reuse one layer runs that layer's q/k norms; donors are never
    replaced units themselves."""
    num_units = num_units or units(geometry(model))
    moved = lent_norms(model, assign, kinds, spec, num_units) if norms == "donor" else []
    targets = [t for unit in assign for t in unit_tensors(model, unit, kinds, spec, num_units)]
    sources = [t for donor in assign.values() for t in unit_tensors(model, donor, kinds, spec, num_units)]
    targets += [t for t, _ in moved]
    sources += [s for _, s in moved]
    saved = [t.detach().clone() for t in targets]
    with torch.no_grad():
        for t, s in zip(targets, sources):
            t.copy_(s)
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(targets, saved):
                t.copy_(s)


def output_columns(part: Part, geo, unit: int) -> slice:
    """The columns of o_proj's input (the concatenated head outputs, H*d) that one ``part`` unit changes: its query
    head's d, or its KV head's G query heads' G*d."""
    width = geo.head_dim * (1 if part.per_query_head else geo.group_size)
    return slice(unit * width, (unit + 1) * width)


def contribution(heads: torch.Tensor, o_weight: torch.Tensor, cols: slice) -> torch.Tensor:
    """One unit's share of the attention output: heads (N, T, H*d), o_weight (D, H*d) -> (N, T, D)."""
    return heads[..., cols] @ o_weight[:, cols].T


def local_changes(model: nn.Module, inputs: dict[int, tuple[tuple, dict]], candidates: dict[Unit, list[Unit]],
                  part: Part, kinds: tuple[str, ...], progress: bool = False,
                  norms: str = "own") -> dict[Unit, dict[Unit, float]]:
    """For every ``part`` unit and each of its candidate donors, the relative change of its layer's attention output.

    A unit's slices reach only its own columns of o_proj's input (its heads' outputs) and, sharing o, its own
    columns of W_o, so the change of the output is the change of the unit's contribution. Each attention call
    therefore measures every unit of the layer at once, each with its next candidate (U pairs per call).

    ``norms="donor"`` moves the donor layer's q/k norms with its slices where a unit is its layer's only one (one KV
    head): there a call's assignment is exactly a plan's. With several units a call's mix of donors is no plan, and
    the norms stay."""
    spec, geo = arch_of(model), geometry(model)
    num_units = part.units(geo)
    norms = norms if num_units == 1 else "own"
    out: dict[Unit, dict[Unit, float]] = {unit: {} for unit in candidates}
    bar = progress_bar(total=sum(len(c) for c in candidates.values()), desc=f"DirectShare donors (local, {part.name})",
                       unit="pair", show=progress, leave=False)
    heads: list[torch.Tensor] = []  # o_proj's input (N, T, H*d) of the last call
    with torch.no_grad():
        for layer in sorted({layer for layer, _ in candidates}):
            module = attention(model, layer)
            o_proj = getattr(module, spec.o)
            heads.clear()
            hook = o_proj.register_forward_pre_hook(lambda _module, inputs: heads.append(inputs[0]))
            try:
                args, kwargs = inputs[layer]
                norm = module(*args, **kwargs)[0].float().pow(2).sum()  # ||out||^2
                mine = sorted(u for u in candidates if u[0] == layer)
                cols = {unit: output_columns(part, geo, unit[1]) for unit in mine}
                base = {unit: contribution(heads[-1], o_proj.weight, cols[unit]) for unit in mine}  # (N, T, D)
                for step in range(max(len(candidates[unit]) for unit in mine)):
                    assign = {unit: candidates[unit][step] for unit in mine if step < len(candidates[unit])}
                    with units_replaced(model, assign, kinds, spec, num_units, norms):
                        module(*args, **kwargs)
                        for unit, donor in assign.items():
                            now = contribution(heads[-1], o_proj.weight, cols[unit])
                            out[unit][donor] = relative_change(now, base[unit], norm)
                    heads.clear()
                    bar.update(len(assign))
            finally:
                hook.remove()
    bar.close()
    return out


# --------------------------------------------------------------------------------------------------- the planner


def heldout_seq_len(model: nn.Module, tokens: int) -> int:
    """Held-out block length: 256 tokens, fewer for a shorter text budget or a shorter model context."""
    limit = getattr(model.config, "max_position_embeddings", None) or SEQ_LEN
    return max(2, min(SEQ_LEN, tokens, limit))


def part_vectors(model: nn.Module, layer: int, part: Part, match: str) -> torch.Tensor:
    """Each ``part`` unit's flattened weights for the cosine order of unmeasured donors: (U, n). KV-group units
    use the ``match`` function (as the cosine rule does); finer units their own slices."""
    if part is GROUP:
        return unit_vectors(model, layer, match)
    num_units = part.units(geometry(model))
    return torch.cat([unit_rows(projection_weight(model, layer, k), num_units).flatten(1) for k in part.kinds],
                     dim=1).detach().float()  # (U, sum of r*D)


class UnitCosts:
    """Measured costs of replacing each unit of each part on one model: local donor changes, then single-unit KL.

    Units are keyed (part name, layer, unit)."""

    def __init__(self, model: nn.Module, config: DirectShareConfig, *, progress: bool = True) -> None:
        self.config, self.progress = config, progress
        geo = geometry(model)
        self.parts = GRANULARITIES[config.granularity]
        self.sizes = {part.name: part_parameters(model, part, config.share_o) for part in self.parts}
        self.probe = PlanProbe(model, text=config.calib_text, tokens=HELDOUT_OFFSET,
                               seq_len=heldout_seq_len(model, config.loss_tokens), heldout=config.loss_tokens,
                               progress=progress)
        inputs = attention_inputs(model, self.probe.heldout[:, :LOCAL_TOKENS])
        allowed = same_kind_earlier(geo)  # donors of the unit's kind only
        self.local: dict[str, dict[Unit, dict[Unit, float]]] = {}
        self.order: dict[str, dict[Unit, list[Unit]]] = {}
        for part in self.parts:
            vectors = torch.stack([part_vectors(model, l, part, config.match) for l in range(geo.num_layers)])
            by_cosine = cosine_order(vectors, allowed)  # (L, U, n) -> donors by cosine
            searched = {unit: order[: config.donor_pool or None] for unit, order in by_cosine.items()}
            kinds = part_kinds(part, config.share_o)
            self.local[part.name] = local_changes(model, inputs, searched, part, kinds, progress, config.norms)
            self.order[part.name] = donor_order(self.local[part.name], by_cosine)
        del inputs
        self.single = self._single_unit()
        log.info("DirectShare single-unit KL on %d held-out tokens: %s", self.probe.heldout.numel(),
                 {f"{name}.{l}.{u}": round(kl, 4) for (name, l, u), kl in sorted(self.single.items())})

    def plan(self, chosen: list[Key]) -> DirectSharePlan:
        shared = {part.name: assign_donors([(l, u) for name, l, u in chosen if name == part.name],
                                           self.order[part.name]) for part in self.parts}
        return DirectSharePlan(**DirectSharePlan.lists(self.config.granularity, shared),
                               granularity=self.config.granularity,
                               match=self.config.match, share_o=self.config.share_o, norms=self.config.norms)

    def _single_unit(self) -> dict[Key, float]:
        keys = [(part.name, *unit) for part in self.parts for unit in sorted(self.order[part.name])]
        bar = progress_bar(keys, desc="DirectShare units (KL)", unit="unit", show=self.progress, leave=False)
        return {key: self.probe.measure(self.plan([key])).kl for key in bar}

    def size(self, key: Key) -> int:
        return self.sizes[key[0]]

    def selections(self, budgets: list[int]) -> dict[int, list[Key]]:
        """The chosen units for each parameter budget: the lowest single-unit KLs per parameter that fit (for
        KV-group units, the budget's count of lowest KLs), or greedy selection (nested prefixes, KV-group units)."""
        ranked = sorted(self.single, key=lambda key: (self.single[key] / self.size(key), key))
        window = self.config.greedy
        if not window:
            return {budget: fitting(ranked, self.size, budget) for budget in budgets}
        counts = {budget // self.size(ranked[0]): budget for budget in budgets} if ranked else {0: 0}
        chosen: list[Key] = []
        out = {budget: [] for count, budget in counts.items() if not count}
        steps = progress_bar(range(max(counts)), desc="DirectShare greedy selection", unit="unit",
                             show=self.progress, leave=False)
        for _ in steps:
            options = [key for key in ranked if key not in chosen][:window]
            trials = {key: self.probe.measure(self.plan([*chosen, key])).kl for key in options}
            chosen.append(min(options, key=lambda key: (trials[key], key)))
            if len(chosen) in counts:
                out[counts[len(chosen)]] = list(chosen)
        return out


def fitting(ranked: list[Key], size, budget: int) -> list[Key]:
    """Walk ``ranked`` and keep every unit that still fits in ``budget`` parameters."""
    chosen, used = [], 0
    for key in ranked:
        if used + size(key) <= budget:
            chosen.append(key)
            used += size(key)
    return chosen


def loss_pairs(model: nn.Module, configs: list[DirectShareConfig], *,
               progress: bool = True) -> list[dict[str, list[Pair]]]:
    """Pairs of each part (by part name) for each config (same planner settings, any ratios) from ONE measurement
    run (see module doc)."""
    geo = geometry(model)
    parts = GRANULARITIES[configs[0].granularity]
    sizes = {part: part_parameters(model, part, configs[0].share_o) for part in parts}
    budgets = [replaced_budget(c.ratio, geo, sizes) for c in configs]
    if not any(budgets):  # nothing to replace (ratio 0, or a one-layer model): nothing to measure
        return [{} for _ in configs]
    costs = UnitCosts(model, configs[0], progress=progress)
    chosen = costs.selections(sorted(set(budgets)))
    plans = {budget: costs.plan(chosen[budget]) for budget in set(budgets)}
    for budget, plan in sorted(plans.items()):
        if plan.num_pairs:
            score = costs.probe.measure(plan)
            log.info("DirectShare (loss) %s: KL %.4f, held-out ppl %.3f", plan.summary(), score.kl, score.ppl)
    log.info("DirectShare planning measured %d plans", costs.probe.measured)
    return [{part.name: pairs for part, pairs in plans[budget].parts()} for budget in budgets]
