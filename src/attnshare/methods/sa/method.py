"""SA: apply a plan by replacing receivers' attention and hooking their donors."""

from __future__ import annotations

import dataclasses

from torch import nn

from ...analysis.heads import head_maps_for
from ...arch import REPLACE_ATTENTION, arch_of, attention, geometry, qk_parameters, require, set_attention
from ...attention.dispatch import Publisher, clear_hook, install, set_hook
from ...errors import AttnshareError
from ...plan import units_for
from ...sharing.state import Applied, SharingState
from ..base import SharingMethod
from ..surgery import detach, reattach
from .config import SAConfig
from .modules import SharedAttentionReceiver
from .plan import SAPlan, nearest_donors
from .planner import plan_sa, plan_sa_curve, sa_budget


class SA(SharingMethod):
    name = "sa"
    config_cls = SAConfig
    plan_cls = SAPlan

    def make_plan(self, model: nn.Module, config: SAConfig) -> SAPlan:
        require(model, REPLACE_ATTENTION, "SA")
        geo = geometry(model)
        if config.receivers:
            plan = SAPlan(donors=nearest_donors(config.receivers, geo), fused_prefill=config.fused_prefill)
            if config.align_heads:
                plan.head_map = head_maps_for(model, plan.donors, text=config.calib_text, tokens=config.calib_tokens,
                                              seq_len=config.calib_seq_len)
            return plan
        if config.budget or config.kv_saving:
            return plan_sa(model, config)
        raise AttnshareError("SA needs --receivers LAYER..., --budget N or --kv-saving F to choose receiver layers.")

    def config_for_saving(self, model: nn.Module, kind: str, fraction: float) -> SAConfig | None:
        """Aligned receivers: each saves 1/(2L) of the KV cache, or its q/k parameters."""
        geo = geometry(model)
        if kind == "kv":
            count = units_for(fraction * 2 * geo.num_layers)
        else:
            qk = min(qk_parameters(model, layer) for layer in range(geo.num_layers))
            count = units_for(fraction * model.num_parameters() / qk)
        return SAConfig(budget=count, align_heads=True) if 1 <= count <= geo.num_layers - 1 else None

    def make_plans(self, model: nn.Module, configs: list[SAConfig]) -> list[SAPlan]:
        """A receiver-budget sweep costs one greedy selection: the plans of smaller budgets are its prefixes."""
        if not configs:
            return []
        require(model, REPLACE_ATTENTION, "SA")
        same = [dataclasses.replace(c, budget=0, kv_saving=0.0) for c in configs]
        config_budgets = [c.budget for c in configs if c.budget and not c.receivers]
        if config_budgets and len(config_budgets) == len(configs) and all(c == same[0] for c in same):
            plans = plan_sa_curve(model, configs[0], config_budgets)
            return [plans[sa_budget(c, geometry(model).num_layers)] for c in configs]
        return super().make_plans(model, configs)

    def trainable_parameters(self, model: nn.Module, plan: SAPlan) -> list[tuple[str, nn.Parameter]]:
        """Healing trains the receivers' remaining projections (V and O)."""
        spec = arch_of(model)
        prefixes = tuple(f"{spec.layers}.{r}.{spec.attn}." for r in plan.donors)
        return [(n, p) for n, p in model.named_parameters() if n.startswith(prefixes)]

    def apply(self, model: nn.Module, plan: SAPlan, state: SharingState, applied: Applied) -> None:
        if plan.donors:
            require(model, REPLACE_ATTENTION, "SA")  # before anything changes
        spec, geo = arch_of(model), geometry(model)
        install(model)
        for receiver, donor in sorted(plan.donors.items()):
            base = attention(model, receiver)
            if getattr(base, "computes_attention", True) is False:
                raise AttnshareError(f"Layer {receiver} computes no attention (it was dropped), so it cannot be an SA "
                                     "receiver; leave it out of the SA plan.")
            path = f"{spec.layers}.{receiver}.{spec.attn}"
            removable = [spec.q, spec.k] + (["q_norm", "k_norm"] if spec.qk_norm else [])
            detached = detach(base, path, removable, keep=state.keep_originals)
            receiver_module = SharedAttentionReceiver(
                base, spec.v, spec.o, donor, state.context, plan.head_map.get(receiver), geo.head_dim
            )
            set_attention(model, receiver, receiver_module)
            state.context.add_edge(donor, receiver)
            donor_module = attention(model, donor)
            if not isinstance(getattr(donor_module, "attnshare_hook", None), Publisher):
                set_hook(donor_module, Publisher(state.context, donor, fused_prefill=plan.fused_prefill))

            def undo(receiver=receiver, donor=donor, base=base, detached=detached):
                reattach(detached, state.base_state_dict)
                set_attention(model, receiver, base)
                state.context.remove_consumer(receiver)
                if not state.context.publishes(donor):
                    clear_hook(attention(model, donor))

            applied.undo.append(undo)
