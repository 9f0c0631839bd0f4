"""Mix's planner: a greedy path that, step by step, turns a layer into an SA receiver or drops it (or drops a
receiver), always the move with the least measured KL increase per unit of saving, until each budget is met; the
same walk restricted to drops only and to SA receivers only; each budget takes the path of least measured KL.

Savings are counted in the budget's own unit: half-layers of KV cache (a receiver frees K, 1; a dropped layer K
and V, 2) or parameters (a receiver frees its q/k, a dropped layer all of its attention).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from torch import nn

from ...analysis.sensitivity import Divergence
from ...arch import attention_parameters, geometry, qk_parameters
from ...errors import AttnshareError
from ...plan import units_for
from ...progress import progress_bar
from ..sa.plan import nearest_donors
from ..sa.planner import PlanProbe
from .config import MixConfig
from .plan import MixPlan

log = logging.getLogger(__name__)

ACTIONS = ("sa", "drop")
# Greedy paths walked; each budget takes the plan of least measured KL, so a mix plan is never worse on the
# calibration tokens than the pure plans it contains (measured: the mixed path alone lost to drop-only at 13% KV)
PATHS = (ACTIONS, ("drop",), ("sa",))
NEAR = 4  # donor distances whose head maps are measured up front (farther ones when a plan first needs them)
Assignment = dict[int, str]  # layer -> "sa" or "drop" (absent: kept)


def budget_gains(model: nn.Module, config: MixConfig) -> tuple[float, Callable[[int, str], float]]:
    """The total saving the budget asks for, and the saving of each (layer, action), in the budget's unit."""
    geo = geometry(model)
    if config.kv_saving:
        units = {"sa": 1, "drop": 2}  # of 2L half-layers of KV cache
        return units_for(config.kv_saving * 2 * geo.num_layers), lambda layer, action: units[action]
    def params(layer: int, action: str) -> float:
        return attention_parameters(model, layer) if action == "drop" else qk_parameters(model, layer)

    return config.param_saving * model.num_parameters(), params


def moves(assign: Assignment, layers: dict[str, list[int]]) -> list[tuple[int, str]]:
    """Upgrades of an assignment: a kept layer becomes a receiver or is dropped; a receiver is dropped."""
    out = [(layer, "sa") for layer in layers["sa"] if layer not in assign]
    out += [(layer, "drop") for layer in layers["drop"] if assign.get(layer) != "drop"]
    return out


def plan_mix_curve(model: nn.Module, config: MixConfig, targets: list[float], *, progress: bool = True) -> list[MixPlan]:
    """Mix plans for several savings targets (in the budget's unit, increasing): per target the least-KL plan of
    the greedy paths in :data:`PATHS`."""
    geo = geometry(model)
    _, gain = budget_gains(model, config)
    probe = PlanProbe.of(model, config, progress)

    def make(assign: Assignment) -> MixPlan | None:
        drop = frozenset(layer for layer, a in assign.items() if a == "drop")
        receivers = sorted(layer for layer, a in assign.items() if a == "sa")
        try:
            donors = nearest_donors(receivers, geo, unavailable=drop)
        except AttnshareError:
            return None
        head_map = probe.head_maps(donors) if config.align_heads and donors else {}
        return MixPlan(drop=sorted(drop), donors=donors, head_map=head_map)

    if config.align_heads:  # head maps of every near (donor, receiver) pair in one calibration pass
        near = sorted({(d, r) for r in range(1, geo.num_layers) for d in range(max(0, r - NEAR), r)
                       if geo.layer_types[d] == geo.layer_types[r]})
        probe.head_map_pairs(near)
    candidates = {"sa": [layer for layer in range(1, geo.num_layers) if make({layer: "sa"})],
                  "drop": list(range(geo.num_layers))}
    seen: dict[tuple, Divergence] = {}

    def measure(plan: MixPlan) -> Divergence:  # the paths share their first steps: each plan is measured once
        key = (tuple(plan.drop), tuple(sorted(plan.donors.items())))
        if key not in seen:
            seen[key] = probe.measure(plan)
        return seen[key]

    def first(plan: MixPlan) -> Divergence:  # the first pass over every move: on the screening tokens, if any
        return probe.measure(plan, screen=True) if probe.screen else measure(plan)

    single = {(layer, a): first(make({layer: a})) for a in ACTIONS
              for layer in progress_bar(candidates[a], desc=f"mix single-layer {a}", unit="layer", show=progress,
                                        leave=False)}
    needed = math.ceil(max(targets) / min(gain(layer, "sa") for layer in candidates["sa"]))
    keep = config.shortlist or needed + 8
    layers = {a: sorted(candidates[a], key=lambda layer: (single[(layer, a)].kl, layer))[:keep] for a in ACTIONS}
    if probe.screen:  # the shortlisted moves measured on all held-out tokens
        single = {(layer, a): measure(make({layer: a})) for a in ACTIONS for layer in layers[a]}
        layers = {a: sorted(layers[a], key=lambda layer: (single[(layer, a)].kl, layer)) for a in ACTIONS}

    paths = {actions: greedy_path(measure, make, gain, single, layers, sorted(targets), actions,
                                  config.greedy_width, progress) for actions in PATHS}
    plans = []
    for i, target in enumerate(sorted(targets)):
        found = {actions: path[i] for actions, path in paths.items() if i < len(path)}
        actions = min(found, key=lambda a: (found[a][1], PATHS.index(a)))  # least measured KL; ties to the mix
        plans.append(found[actions][0])
        log.info("%s: %s (KL %.4f; paths %s)", target, plans[-1].summary(), found[actions][1],
                 ", ".join(f"{'+'.join(a)} {kl:.4f}" for a, (_, kl) in found.items()))
    log.info("mix planning measured %d plans", probe.measured)
    return plans


def greedy_path(measure: Callable[[MixPlan], Divergence], make: Callable[[Assignment], MixPlan | None],
                gain: Callable[[int, str], float], single: dict, layers: dict[str, list[int]], targets: list[float],
                actions: tuple[str, ...], width: int, progress: bool) -> list[tuple[MixPlan, float]]:
    """Lazy greedy over the moves of ``actions`` (each step: the least measured KL increase per unit of saving)
    until each target (increasing) is met: (plan, KL) per target these moves can reach."""
    assign: Assignment = {}
    kl, out = 0.0, []
    last = {move: single[move].kl / gain(*move) for move in single}  # KL per unit when last measured (lazy greedy)
    allowed = {a: layers[a] if a in actions else [] for a in ACTIONS}

    def saving() -> float:
        return sum(gain(layer, a) for layer, a in assign.items())

    def added(layer: int, action: str) -> float:  # saving a move adds to the current assignment
        return gain(layer, action) - (gain(layer, "sa") if assign.get(layer) == "sa" else 0)

    for target in progress_bar(targets, desc=f"mix greedy {'+'.join(actions)}", unit="budget", show=progress,
                               leave=False):
        while saving() < target - 1e-9:
            options = moves(assign, allowed)
            fitting = [m for m in options if added(*m) <= target - saving() + 1e-9] or options
            fitting.sort(key=lambda m: (last[m], m))
            trials = {}
            for move in fitting:
                if width and len(trials) >= width:
                    break
                plan = make({**assign, move[0]: move[1]})
                if plan is not None:
                    trials[move] = measure(plan)
                    last[move] = (trials[move].kl - kl) / added(*move)
            if not trials:
                if actions != ACTIONS:
                    return out  # a pure path that cannot reach the budget (SA alone past L-1 receivers)
                raise AttnshareError(f"mix found no valid move after {assign}; ask for a smaller saving.")
            move = min(trials, key=lambda m: (last[m], m))
            assign[move[0]] = move[1]
            kl = trials[move].kl
        out.append((make(assign), kl))
    return out


def plan_mix(model: nn.Module, config: MixConfig, *, progress: bool = True) -> MixPlan:
    target, _ = budget_gains(model, config)
    return plan_mix_curve(model, config, [target], progress=progress)[0]
