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
from tqdm.auto import tqdm

from ...analysis.weights import projection_weight, same_kind_earlier, unit_cols, unit_rows, unit_vectors, units
from ...arch import ArchSpec, arch_of, attention, geometry
from ..sa.planner import PlanProbe
from .config import DirectShareConfig
from .plan import DirectSharePlan, Pair, num_replaced
from .planner import earlier_similarities

log = logging.getLogger(__name__)

Unit = tuple[int, int]  # (layer, unit)

HELDOUT_OFFSET = 1024  # held-out tokens follow the first 1024 calibration tokens (as for SA, LiSA, the analysis)
SEQ_LEN = 256  # tokens per held-out block (shorter for models with a shorter context)
LOCAL_TOKENS = 128  # the local donor search reads the first 128 tokens of each block (measured: 2.6x faster than
# 256 on SmolLM2, its picks within a few percent of the 256-token best; docs/results/directshare.md)


# ------------------------------------------------------------------------------------------------ pure helpers


def relative_change(out: torch.Tensor, base: torch.Tensor) -> float:
    """``||out - base||^2 / ||base||^2`` over all elements; out, base (N, T, D)."""
    return float((out.float() - base.float()).pow(2).sum() / base.float().pow(2).sum().clamp_min(1e-30))


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


def unit_tensors(model: nn.Module, unit: Unit, kinds: tuple[str, ...], spec: ArchSpec) -> list[torch.Tensor]:
    """Views of one unit's slices: q/k/v rows (r, D), their biases (r,), o columns (D, r) when "o" is in kinds."""
    layer, index = unit
    num_units = units(geometry(model))
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


@contextmanager
def unit_replaced(model: nn.Module, unit: Unit, donor: Unit, kinds: tuple[str, ...], spec: ArchSpec) -> Iterator[None]:
    """While active, ``unit``'s slices hold ``donor``'s values (written in place, restored on exit)."""
    targets = unit_tensors(model, unit, kinds, spec)
    sources = unit_tensors(model, donor, kinds, spec)
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


def local_changes(model: nn.Module, inputs: dict[int, tuple[tuple, dict]], candidates: dict[Unit, list[Unit]],
                  kinds: tuple[str, ...], progress: bool = False) -> dict[Unit, dict[Unit, float]]:
    """For every unit and each of its candidate donors, the relative change of its layer's attention output."""
    spec = arch_of(model)
    out: dict[Unit, dict[Unit, float]] = {}
    bar = tqdm(total=sum(len(c) for c in candidates.values()), desc="DirectShare donors (local)", unit="pair",
               disable=not progress, leave=False)
    with torch.no_grad():
        for layer in sorted({layer for layer, _ in candidates}):
            module = attention(model, layer)
            args, kwargs = inputs[layer]
            base = module(*args, **kwargs)[0]  # (N, T, D)
            for unit in sorted(u for u in candidates if u[0] == layer):
                out[unit] = {}
                for donor in candidates[unit]:
                    with unit_replaced(model, unit, donor, kinds, spec):
                        out[unit][donor] = relative_change(module(*args, **kwargs)[0], base)
                    bar.update()
    bar.close()
    return out


# --------------------------------------------------------------------------------------------------- the planner


def heldout_seq_len(model: nn.Module, tokens: int) -> int:
    """Held-out block length: 256 tokens, fewer for a shorter text budget or a shorter model context."""
    limit = getattr(model.config, "max_position_embeddings", None) or SEQ_LEN
    return max(2, min(SEQ_LEN, tokens, limit))


class UnitCosts:
    """Measured costs of replacing each unit on one model: local donor changes, then single-unit KL."""

    def __init__(self, model: nn.Module, config: DirectShareConfig, *, progress: bool = True) -> None:
        self.config, self.progress = config, progress
        self.kinds = ("q", "k", "v", "o") if config.share_o else ("q", "k", "v")
        num_layers = geometry(model).num_layers
        vectors = torch.stack([unit_vectors(model, l, config.match) for l in range(num_layers)])  # (L, U, n)
        by_cosine = cosine_order(vectors, same_kind_earlier(geometry(model)))  # donors of the unit's kind only
        self.probe = PlanProbe(model, text=config.calib_text, tokens=HELDOUT_OFFSET,
                               seq_len=heldout_seq_len(model, config.loss_tokens), heldout=config.loss_tokens,
                               progress=progress)
        pool = config.donor_pool or None
        searched = {unit: order[:pool] for unit, order in by_cosine.items()}
        inputs = attention_inputs(model, self.probe.heldout[:, :LOCAL_TOKENS])
        self.local = local_changes(model, inputs, searched, self.kinds, progress)
        del inputs
        self.order = donor_order(self.local, by_cosine)
        self.single = self._single_unit()
        log.info("DirectShare single-unit KL on %d held-out tokens: %s", self.probe.heldout.numel(),
                 {f"{l}.{u}": round(kl, 4) for (l, u), kl in sorted(self.single.items())})

    def plan(self, chosen: list[Unit]) -> DirectSharePlan:
        return DirectSharePlan(pairs=assign_donors(chosen, self.order), match=self.config.match,
                               share_o=self.config.share_o)

    def _single_unit(self) -> dict[Unit, float]:
        candidates = sorted(self.order)
        bar = tqdm(candidates, desc="DirectShare units (KL)", unit="unit", disable=not self.progress, leave=False)
        return {unit: self.probe.measure(self.plan([unit])).kl for unit in bar}

    def selections(self, counts: list[int]) -> dict[int, list[Unit]]:
        """The chosen units for each count: the lowest single-unit KLs, or greedy selection (nested prefixes)."""
        ranked = lowest(self.single)
        window = self.config.greedy
        if not window:
            return {count: ranked[:count] for count in counts}
        top = max(counts)
        chosen: list[Unit] = []
        out = {0: []} if 0 in counts else {}
        steps = tqdm(range(top), desc="DirectShare greedy selection", unit="unit", disable=not self.progress,
                     leave=False)
        for _ in steps:
            options = [unit for unit in ranked if unit not in chosen][:window]
            trials = {unit: self.probe.measure(self.plan([*chosen, unit])).kl for unit in options}
            chosen.append(min(options, key=lambda unit: (trials[unit], unit)))
            if len(chosen) in counts:
                out[len(chosen)] = list(chosen)
        return out


def loss_pairs(model: nn.Module, configs: list[DirectShareConfig], *, progress: bool = True) -> list[list[Pair]]:
    """Pairs for each config (same planner settings, any ratios) from ONE measurement run (see module doc)."""
    geo = geometry(model)
    num_units = units(geo)
    counts = [num_replaced(c.ratio, geo.num_layers, num_units) for c in configs]
    if not any(counts):  # nothing to replace (ratio 0, or a one-layer model): nothing to measure
        return [[] for _ in configs]
    costs = UnitCosts(model, configs[0], progress=progress)
    chosen = costs.selections(sorted(set(counts)))
    plans = {count: costs.plan(chosen[count]) if count else DirectSharePlan() for count in set(counts)}
    for count, plan in sorted(plans.items()):
        if count:
            score = costs.probe.measure(plan)
            log.info("DirectShare (loss) %d units: KL %.4f, held-out ppl %.3f", count, score.kl, score.ppl)
    log.info("DirectShare planning measured %d plans", costs.probe.measured)
    return [plans[count].pairs for count in counts]

