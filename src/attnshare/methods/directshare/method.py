"""DirectShare: replaced units reuse their root unit's W_q/W_k/W_v (and W_o) slices, stored once in a bank."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from ...analysis.weights import projection_weight, unit_cols, unit_rows
from ...arch import Geometry, arch_of, attention, attention_parameters, geometry
from ...errors import AttnshareError
from ...plan import units_for
from ...sharing.state import Applied, SharingState
from ..base import SharingMethod
from ..surgery import detach, reattach
from .config import DirectShareConfig
from .loss_planner import loss_pairs
from .modules import ROW_KINDS, GatheredLinear, SharedNorm, UnitBank, compact
from .plan import (
    GRANULARITIES,
    GROUP,
    DirectSharePlan,
    Pair,
    Part,
    grains,
    norms_can_travel,
    part_parameters,
    select_pairs,
)
from .planner import best_matches

BANK = "attnshare_unit_bank"  # attribute of the causal LM holding the UnitBank


def unit_slice(weight, kind: str, num_units: int, unit: int):
    """The slice of one unit: q/k/v rows (r, D), o columns (D, r); a view."""
    return unit_rows(weight, num_units)[unit] if kind in ROW_KINDS else unit_cols(weight, num_units)[unit]


class DirectShare(SharingMethod):
    name = "directshare"
    config_cls = DirectShareConfig
    plan_cls = DirectSharePlan

    def make_plan(self, model: nn.Module, config: DirectShareConfig) -> DirectSharePlan:
        return self.make_plans(model, [config])[0]

    def make_plans(self, model: nn.Module, configs: list[DirectShareConfig]) -> list[DirectSharePlan]:
        """Plans for several configs; loss-selected ones that differ only in ratio share one measurement run."""
        shared: list[dict[str, list[Pair]] | None] = [None] * len(configs)
        groups: dict[str, list[int]] = {}
        for i, config in enumerate(configs):
            matches = best_matches(model, config.match)  # data-free; also refuses a model without projections
            if config.select == "cosine":
                shared[i] = {GROUP.name: select_pairs(matches, config.ratio)}
            else:
                groups.setdefault(repr(dataclasses.replace(config, ratio=0.0)), []).append(i)
        for members in groups.values():
            for i, found in zip(members, loss_pairs(model, [configs[i] for i in members])):
                shared[i] = found
        return [self.plan_for(model, config, found) for config, found in zip(configs, shared)]

    def config_for_saving(self, model: nn.Module, kind: str, fraction: float) -> DirectShareConfig | None:
        """Parameters only (every layer keeps its own K/V cache): enough replaced units (of the default
        granularity), each saving its slices and biases, to save ``fraction`` of the model's parameters, units
        chosen by measured loss."""
        if kind != "params":
            return None
        geo, config = geometry(model), DirectShareConfig()
        sizes = {part: part_parameters(model, part) for part in GRANULARITIES[config.granularity]}
        grain, per_layer = grains(sizes, geo)
        count, total = units_for(fraction * model.num_parameters() / grain), geo.num_layers * per_layer
        return dataclasses.replace(config, ratio=count / total) if 1 <= count <= total - per_layer else None

    def plan_for(self, model: nn.Module, config: DirectShareConfig, shared: dict[str, list[Pair]]) -> DirectSharePlan:
        """The plan of ``config`` with the chosen pairs of each part (by part name) and what they reach on
        ``model`` (PostShare adds its training settings)."""
        geo = geometry(model)
        parts = GRANULARITIES[config.granularity]
        attn = sum(attention_parameters(model, layer) for layer in range(geo.num_layers))
        reached = {"units": sum(len(shared.get(p.name, [])) for p in parts),
                   "of": geo.num_layers * sum(p.units(geo) for p in parts),
                   "params": sum(len(shared.get(p.name, [])) * part_parameters(model, p, config.share_o)
                                 for p in parts), "attention": attn}
        if config.granularity != "group":  # units of unequal size: the ratio is a fraction of these parameters
            reached["shareable"] = geo.num_layers * sum(p.units(geo) * part_parameters(model, p, config.share_o)
                                                        for p in parts)
        plan = self.plan_cls(**DirectSharePlan.lists(config.granularity, shared), granularity=config.granularity,
                             match=config.match, share_o=config.share_o, ratio=config.ratio, select=config.select,
                             reached=reached, norms=config.norms)
        borrowed = travelling_norms(model, plan)
        if borrowed:
            reached["norms"] = len(borrowed)
        return plan

    def trainable_parameters(self, model: nn.Module, plan: DirectSharePlan) -> list[tuple[str, nn.Parameter]]:
        """Healing trains the bank: the unique (and therefore shared) unit slices."""
        return [(n, p) for n, p in model.named_parameters() if n.startswith(BANK + ".")]

    def apply(self, model: nn.Module, plan: DirectSharePlan, state: SharingState, applied: Applied) -> None:
        if not plan.num_pairs:
            return
        if hasattr(model, BANK):
            raise AttnshareError("Weight sharing is already applied to this model; unapply it before sharing again.")
        spec, geo = arch_of(model), geometry(model)
        kinds = list(ROW_KINDS) + (["o"] if plan.share_o else [])
        weights = {(l, k): projection_weight(model, l, k, spec) for l in plan.layers for k in kinds}  # checks first
        index: dict[tuple[int, str], list[int]] = {}  # (layer, kind) -> bank row of each of its units
        bank_w, bank_b = {}, {}
        for k in kinds:
            part = plan.part_of(k)
            num_units, roots = part.units(geo), plan.roots_of(part)
            rows = bank_rows(plan, part, geo)  # unique unit -> bank row
            index.update({(l, k): [rows[roots.get((l, u), (l, u))] for u in range(num_units)] for l in plan.layers})
            slices = [unit_slice(weights[l, k], k, num_units, u) for l, u in rows]
            bank_w[k] = stack_copy(slices, dim=0 if k in ROW_KINDS else 1)  # q/k/v (N, r, D); o (D, N, r)
            biases = [getattr(getattr(attention(model, l), getattr(spec, k)), "bias", None) for l, _ in rows]
            if k in ROW_KINDS and biases[0] is not None:
                bank_b[k] = stack_copy([biases[i].view(num_units, -1)[u] for i, (_, u) in enumerate(rows)])  # (N, r)
        borrowed = travelling_norms(model, plan)
        lending = sorted({(name, lender) for (name, _), lender in borrowed.items()})
        norm_keys = {**{(name, lender): f"{name}_{lender}" for name, lender in lending},  # lenders run it too
                     **{(name, layer): f"{name}_{lender}" for (name, layer), lender in borrowed.items()}}
        lent = {f"{name}_{lender}": copy.deepcopy(getattr(attention(model, lender), name))  # fresh storage: the
                for name, lender in lending}  # layers' own norms are freed below
        bank = UnitBank(bank_w, bank_b, lent)
        records = []
        for layer in plan.layers:
            attn = attention(model, layer)
            modules = {name: SharedNorm(bank, key) for (name, l), key in norm_keys.items() if l == layer}
            for k in kinds:
                base = getattr(attn, getattr(spec, k))
                own_bias = base.bias.detach().clone() if k == "o" and base.bias is not None else None
                modules[getattr(spec, k)] = GatheredLinear(bank, k, index[layer, k], base.in_features,
                                                           base.out_features, own_bias)
            detached = detach(attn, f"{spec.layers}.{layer}.{spec.attn}", list(modules), keep=state.keep_originals)
            for name, module in modules.items():
                setattr(attn, name, module)
            records.append(detached)
        model.add_module(BANK, bank)

        def undo(records=records):
            for detached in reversed(records):
                reattach(detached, state.base_state_dict)
            delattr(model, BANK)

        applied.undo.append(undo)


    def settle(self, model: nn.Module, plan: DirectSharePlan, state: SharingState) -> None:
        """Bank rows that no remaining projection reads (a later SA plan removed its receivers' q/k) are freed."""
        bank = getattr(model, BANK, None)
        if bank is not None:
            compact(bank, [m for m in model.modules() if isinstance(m, GatheredLinear) and m.bank is bank],
                    [m for m in model.modules() if isinstance(m, SharedNorm) and m.bank is bank])


def travelling_norms(model: nn.Module, plan: DirectSharePlan) -> dict[tuple[str, int], int]:
    """(norm name, layer) -> lender layer of the q/k norms the plan moves (``norms="donor"``, norms that can travel)."""
    if not norms_can_travel(arch_of(model)):
        return {}
    return plan.norm_lenders(geometry(model))


def bank_rows(plan: DirectSharePlan, part: Part, geo: Geometry) -> dict[tuple[int, int], int]:
    """Bank row of every unique (unreplaced) ``part`` unit of the plan's layers, in (layer, unit) order."""
    roots = plan.roots_of(part)
    unique = [(l, u) for l in plan.layers for u in range(part.units(geo)) if (l, u) not in roots]
    return {lu: i for i, lu in enumerate(unique)}


def stack_copy(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """Stack slices into fresh storage, independent of the base weights (which are then freed)."""
    return torch.stack([t.detach() for t in tensors], dim=dim)
