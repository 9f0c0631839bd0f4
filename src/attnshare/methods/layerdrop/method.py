"""LayerDrop: apply a plan by replacing the chosen decoder blocks with :class:`SkippedBlock`."""

from __future__ import annotations

from torch import nn

from ...arch import arch_of, decoder_layers, geometry
from ...sharing.state import Applied, SharingState
from ..drop.method import RemovalMethod, check_unchanged
from ..surgery import detach, reattach
from .config import LayerDropConfig
from .modules import SkippedBlock
from .plan import LayerDropPlan


class LayerDrop(RemovalMethod):
    name = "layerdrop"
    config_cls = LayerDropConfig
    plan_cls = LayerDropPlan
    part = "block"

    def layer_params(self, model: nn.Module) -> int:
        return min(sum(p.numel() for p in block.parameters()) for block in decoder_layers(model))

    def plan_for(self, layers: list[int]) -> LayerDropPlan:
        return LayerDropPlan(layers=layers)

    def trainable_parameters(self, model: nn.Module, plan: LayerDropPlan) -> list[tuple[str, nn.Parameter]]:
        """Healing trains the first kept block after each removed run (nothing of a removed block is left)."""
        spec, num_layers = arch_of(model), geometry(model).num_layers
        dropped = set(plan.layers)
        after = {next((k for k in range(layer + 1, num_layers) if k not in dropped), None) for layer in dropped}
        prefixes = tuple(f"{spec.layers}.{k}." for k in sorted(after - {None}))
        return [(n, p) for n, p in model.named_parameters() if n.startswith(prefixes)]

    def apply(self, model: nn.Module, plan: LayerDropPlan, state: SharingState, applied: Applied) -> None:
        spec, geo = arch_of(model), geometry(model)
        for layer in plan.layers:
            check_unchanged(model, state, layer, "removed")
        layers = decoder_layers(model)
        for layer in sorted(plan.layers):
            block = layers[layer]
            path = f"{spec.layers}.{layer}"
            detached = detach(block, path, [name for name, _ in block.named_children()], keep=state.keep_originals)
            layers[layer] = SkippedBlock(layer, geo.num_kv_heads)

            def undo(layer=layer, block=block, detached=detached):
                reattach(detached, state.base_state_dict)
                layers[layer] = block

            applied.undo.append(undo)
