"""Mix's planner: one greedy path that, step by step, turns a layer into an SA receiver or drops it (or drops a
receiver), always the move with the least measured KL increase per unit of saving, until each budget is met.

Savings are counted in the budget's own unit: half-layers of KV cache (a receiver frees K, 1; a dropped layer K
and V, 2) or parameters (a receiver frees its q/k, a dropped layer all of its attention).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from torch import nn
from tqdm.auto import tqdm

from ...arch import attention_parameters, geometry, qk_parameters
from ...errors import AttnshareError
from ..sa.plan import nearest_donors
from ..sa.planner import PlanProbe
from .config import MixConfig
from .plan import MixPlan

log = logging.getLogger(__name__)

ACTIONS = ("sa", "drop")
NEAR = 4  # donor distances whose head maps are measured up front (farther ones when a plan first needs them)
Assignment = dict[int, str]  # layer -> "sa" or "drop" (absent: kept)


def budget_gains(model: nn.Module, config: MixConfig) -> tuple[float, Callable[[int, str], float]]:
    """The total saving the budget asks for, and the saving of each (layer, action), in the budget's unit."""
    geo = geometry(model)
    if config.kv_saving:
        units = {"sa": 1, "drop": 2}  # of 2L half-layers of KV cache
        return math.ceil(config.kv_saving * 2 * geo.num_layers - 1e-9), lambda layer, action: units[action]
    def params(layer: int, action: str) -> float:
        return attention_parameters(model, layer) if action == "drop" else qk_parameters(model, layer)

    return config.param_saving * model.num_parameters(), params


def moves(assign: Assignment, layers: dict[str, list[int]]) -> list[tuple[int, str]]:
    """Upgrades of an assignment: a kept layer becomes a receiver or is dropped; a receiver is dropped."""
    out = [(layer, "sa") for layer in layers["sa"] if layer not in assign]
    out += [(layer, "drop") for layer in layers["drop"] if assign.get(layer) != "drop"]
    return out


def plan_mix_curve(model: nn.Module, config: MixConfig, targets: list[float], *, progress: bool = True) -> list[MixPlan]:
    """Mix plans for several savings targets (in the budget's unit, increasing) from one greedy path."""
    geo = geometry(model)
    _, gain = budget_gains(model, config)
    probe = PlanProbe(model, text=config.calib_text, tokens=config.calib_tokens, seq_len=config.calib_seq_len,
                      heldout=config.heldout_tokens, progress=progress)

    def make(assign: Assignment) -> MixPlan | None:
        drop = frozenset(layer for layer, a in assign.items() if a == "drop")
        receivers = sorted(layer for layer, a in assign.items() if a == "sa")
        try:
            donors = nearest_donors(receivers, geo, unavailable=drop)
        except AttnshareError:
            return None
        head_map = probe.head_maps(donors) if config.align_heads and donors else {}
        return MixPlan(drop=sorted(drop), donors=donors, head_map=head_map)

    def saving(assign: Assignment) -> float:
        return sum(gain(layer, a) for layer, a in assign.items())

    if config.align_heads:  # head maps of every near (donor, receiver) pair in one calibration pass
        near = sorted({(d, r) for r in range(1, geo.num_layers) for d in range(max(0, r - NEAR), r)
                       if geo.layer_types[d] == geo.layer_types[r]})
        probe.head_map_pairs(near)
    candidates = {"sa": [layer for layer in range(1, geo.num_layers) if make({layer: "sa"})],
                  "drop": list(range(geo.num_layers))}
    single = {(layer, a): probe.measure(make({layer: a})) for a in ACTIONS
              for layer in tqdm(candidates[a], desc=f"mix single-layer {a}", unit="layer", disable=not progress,
                                leave=False)}
    needed = math.ceil(max(targets) / min(gain(layer, "sa") for layer in candidates["sa"]))
    keep = config.shortlist or needed + 8
    layers = {a: sorted(candidates[a], key=lambda layer: (single[(layer, a)].kl, layer))[:keep] for a in ACTIONS}
    assign: Assignment = {}
    kl, plans = 0.0, []
    last = {move: single[move].kl / gain(*move) for move in single}  # KL per unit when last measured (lazy greedy)

    def added(layer: int, action: str) -> float:  # saving a move adds to the current assignment
        return gain(layer, action) - (gain(layer, "sa") if assign.get(layer) == "sa" else 0)

    bar = tqdm(total=len(targets), desc="mix greedy selection", unit="budget", disable=not progress, leave=False)
    for target in sorted(targets):
        while saving(assign) < target - 1e-9:
            options = moves(assign, layers)
            fitting = [m for m in options if added(*m) <= target - saving(assign) + 1e-9] or options
            fitting.sort(key=lambda m: (last[m], m))
            trials = {}
            for move in fitting:
                if config.greedy_width and len(trials) >= config.greedy_width:
                    break
                plan = make({**assign, move[0]: move[1]})
                if plan is not None:
                    trials[move] = probe.measure(plan)
                    last[move] = (trials[move].kl - kl) / added(*move)
            if not trials:
                raise AttnshareError(f"mix found no valid move after {assign}; ask for a smaller saving.")
            move = min(trials, key=lambda m: (last[m], m))
            assign[move[0]] = move[1]
            kl = trials[move].kl
        plans.append(make(assign))
        log.info("%s (KL %.4f)", plans[-1].summary(), kl)
        bar.update()
    bar.close()
    log.info("mix planning measured %d plans", probe.measured)
    return plans


def plan_mix(model: nn.Module, config: MixConfig, *, progress: bool = True) -> MixPlan:
    target, _ = budget_gains(model, config)
    return plan_mix_curve(model, config, [target], progress=progress)[0]
