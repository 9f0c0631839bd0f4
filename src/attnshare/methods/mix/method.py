"""Mix: apply a plan as its drop part, then its SA part (receivers never reuse a dropped layer)."""

from __future__ import annotations

from torch import nn

from ...arch import REPLACE_ATTENTION, require
from ...sharing.state import Applied, SharingState
from ..base import SharingMethod
from ..drop.method import Drop
from ..sa.method import SA
from .config import MixConfig
from .plan import MixPlan
from .planner import budget_gains, plan_mix, plan_mix_curve


class Mix(SharingMethod):
    name = "mix"
    config_cls = MixConfig
    plan_cls = MixPlan

    def config_for_saving(self, model: nn.Module, kind: str, fraction: float) -> MixConfig:
        return MixConfig(**{"kv_saving" if kind == "kv" else "param_saving": fraction})

    def make_plan(self, model: nn.Module, config: MixConfig) -> MixPlan:
        require(model, REPLACE_ATTENTION, "Mix (its SA receivers)")
        return plan_mix(model, config)

    def make_plans(self, model: nn.Module, configs: list[MixConfig]) -> list[MixPlan]:
        """Budgets of one kind (all KV or all parameters) share one greedy path."""
        require(model, REPLACE_ATTENTION, "Mix (its SA receivers)")
        kinds = {bool(c.kv_saving) for c in configs}
        if len(configs) < 2 or len(kinds) != 1:
            return super().make_plans(model, configs)
        targets = [budget_gains(model, c)[0] for c in configs]
        order = sorted(range(len(configs)), key=lambda i: targets[i])
        plans = plan_mix_curve(model, configs[order[-1]], [targets[i] for i in order])
        out: list[MixPlan] = [None] * len(configs)  # type: ignore[list-item]
        for i, plan in zip(order, plans):
            out[i] = plan
        return out

    def trainable_parameters(self, model: nn.Module, plan: MixPlan) -> list[tuple[str, nn.Parameter]]:
        drop, sa = plan.parts()
        return Drop().trainable_parameters(model, drop) + SA().trainable_parameters(model, sa)

    def apply(self, model: nn.Module, plan: MixPlan, state: SharingState, applied: Applied) -> None:
        drop, sa = plan.parts()
        if sa.donors:
            require(model, REPLACE_ATTENTION, "Mix (its SA receivers)")  # before the drop part changes anything
        Drop().apply(model, drop, state, applied)
        SA().apply(model, sa, state, applied)
