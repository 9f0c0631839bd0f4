"""Drop: apply a plan by replacing the chosen layers' attention with :class:`DroppedAttention`."""

from __future__ import annotations

import dataclasses

from torch import nn

from ...arch import arch_of, attention, attention_parameters, geometry, set_attention
from ...errors import AttnshareError
from ...sharing.state import Applied, SharingState
from ..base import SharingMethod
from ..surgery import detach, reattach
from .config import DropConfig, RemovalConfig
from .modules import DroppedAttention
from .plan import DropPlan
from .planner import plan_removal_curve, removal_count


def check_unchanged(model: nn.Module, state: SharingState, layer: int, what: str) -> None:
    """Refuse to remove a layer an earlier plan already changed or that another layer reads."""
    module = attention(model, layer)
    if type(module).__module__.startswith("attnshare.") or state.context.publishes(layer):
        raise AttnshareError(
            f"Layer {layer}'s attention is already changed or reused by an earlier plan, so it cannot be {what}; "
            "leave it out of the plan or apply this plan first."
        )


def planned_layers(model: nn.Module, config: RemovalConfig, counts: list[int], make, part: str,
                   layer_params: int) -> dict[int, object]:
    """Plans for explicit layers or for each count of layers (checked against the model first)."""
    num_layers = geometry(model).num_layers
    for count in counts:
        removal_count(dataclasses.replace(config, budget=count, kv_saving=0.0, param_saving=0.0, layers=[]),
                      num_layers, layer_params, model.num_parameters())
    return plan_removal_curve(model, config, counts, make, part)


class RemovalMethod(SharingMethod):
    """What drop and layerdrop share: budgets in layers, KV or parameters, and a one-selection budget sweep."""

    part = "attention"  # what block_influence measures
    baseline = True

    def config_for_saving(self, model: nn.Module, kind: str, fraction: float) -> RemovalConfig | None:
        config = self.config_cls(**{"kv_saving" if kind == "kv" else "param_saving": fraction})
        try:
            self.count(model, config)
        except AttnshareError:
            return None
        return config

    def layer_params(self, model: nn.Module) -> int:
        """Parameters one removed layer saves (the smallest over layers, so a parameter budget is always met)."""
        raise NotImplementedError

    def plan_for(self, layers: list[int]):
        raise NotImplementedError

    def count(self, model: nn.Module, config: RemovalConfig) -> int:
        return removal_count(config, geometry(model).num_layers, self.layer_params(model), model.num_parameters())

    def make_plan(self, model: nn.Module, config: RemovalConfig):
        if config.layers:
            return self.plan_for(sorted(config.layers))
        count = self.count(model, config)
        return planned_layers(model, config, [count], self.plan_for, self.part, self.layer_params(model))[count]

    def make_plans(self, model: nn.Module, configs: list[RemovalConfig]) -> list:
        """Budgets that differ only in size share one greedy selection (smaller plans are its prefixes)."""
        if not configs or any(c.layers for c in configs):
            return super().make_plans(model, configs)
        neutral = [dataclasses.replace(c, budget=0, kv_saving=0.0, param_saving=0.0) for c in configs]
        if any(c != neutral[0] for c in neutral):
            return super().make_plans(model, configs)
        counts = [self.count(model, c) for c in configs]
        plans = planned_layers(model, configs[0], sorted(set(counts)), self.plan_for, self.part,
                               self.layer_params(model))
        return [plans[n] for n in counts]


class Drop(RemovalMethod):
    name = "drop"
    config_cls = DropConfig
    plan_cls = DropPlan

    def layer_params(self, model: nn.Module) -> int:
        return min(attention_parameters(model, layer) for layer in range(geometry(model).num_layers))

    def plan_for(self, layers: list[int]) -> DropPlan:
        return DropPlan(layers=layers)

    def trainable_parameters(self, model: nn.Module, plan: DropPlan) -> list[tuple[str, nn.Parameter]]:
        """Healing trains what is left of each dropped layer (its MLP and norms)."""
        spec = arch_of(model)
        prefixes = tuple(f"{spec.layers}.{layer}." for layer in plan.layers)
        return [(n, p) for n, p in model.named_parameters() if n.startswith(prefixes)]

    def apply(self, model: nn.Module, plan: DropPlan, state: SharingState, applied: Applied) -> None:
        spec, geo = arch_of(model), geometry(model)
        for layer in plan.layers:
            check_unchanged(model, state, layer, "dropped")
        for layer in sorted(plan.layers):
            base = attention(model, layer)
            path = f"{spec.layers}.{layer}.{spec.attn}"
            detached = detach(base, path, [name for name, _ in base.named_children()], keep=state.keep_originals)
            set_attention(model, layer, DroppedAttention(layer, geo.num_kv_heads))

            def undo(layer=layer, base=base, detached=detached):
                reattach(detached, state.base_state_dict)
                set_attention(model, layer, base)

            applied.undo.append(undo)
