"""LiSA: apply a plan by replacing attention modules, hooking donors, and train the new modules by distillation."""

from __future__ import annotations

import dataclasses
import logging
import time

from torch import nn

from ...arch import REPLACE_ATTENTION, arch_of, attention, geometry, require, set_attention
from ...attention.dispatch import Publisher, clear_hook, install, set_hook
from ...errors import AttnshareError
from ...sharing.apply import apply
from ...sharing.state import Applied, SharingState
from ...training import train_shared
from ...training.loop import load_blocks
from ...training.shared import distillation
from ..base import SharingMethod
from ..surgery import detach, reattach
from .config import LiSAConfig, default_rank
from .fit import fit_layers, fitted_start
from .modules import BLOCK_ROWS, LiSAAttention
from .plan import LiSAPlan
from .planner import calibration_seq_len, choose_lisa_layers, head_maps
from .training import layer_local_fit, lisa_objective, load_teacher

log = logging.getLogger(__name__)

PARAM_TAG = ".lisa_"  # every new LiSA parameter name contains this
LOCAL_SHARE = 2 / 3  # most of a time budget the layer-local stage may use (it is ~3x cheaper per step)


class LiSA(SharingMethod):
    name = "lisa"
    config_cls = LiSAConfig
    plan_cls = LiSAPlan
    distill_target = "hidden"  # measured: more steps per minute and lower ppl at equal minutes (docs/results/lisa.md)

    def make_plan(self, model: nn.Module, config: LiSAConfig) -> LiSAPlan:
        require(model, REPLACE_ATTENTION, "LiSA")
        geo = geometry(model)
        layers, probe = ((sorted(config.layers), None) if config.layers else
                         choose_lisa_layers(model, config.fraction, config))
        plan = LiSAPlan(layers=layers, rank=config.rank or default_rank(geo.head_dim), ffn_width=config.ffn_width,
                        source=config.source, rope=config.rope, local_steps=config.local_steps,
                        local_repeats=config.local_repeats, fused_prefill=config.fused_prefill)
        plan.validate(geo)
        if config.align_heads:
            plan.head_map = head_maps(model, {layer: layer - 1 for layer in layers}, config, probe)
        if config.init == "fit":
            plan.init = "fit"
            plan.fits = fit_layers(model, layers, plan.head_map, plan.rank, text=config.calib_text,
                                   tokens=config.calib_tokens, seq_len=calibration_seq_len(model, config))
        plan.validate(geo)
        return plan

    def lisa_parameters(self, model: nn.Module, plan: LiSAPlan) -> list[tuple[str, nn.Parameter]]:
        spec = arch_of(model)
        prefixes = tuple(f"{spec.layers}.{layer}.{spec.attn}." for layer in plan.layers)
        return [(n, p) for n, p in model.named_parameters() if n.startswith(prefixes) and PARAM_TAG in n]

    def trainable_parameters(self, model: nn.Module, plan: LiSAPlan) -> list[tuple[str, nn.Parameter]]:
        """Only the alignment FFNs and low-rank projections train; the base model stays frozen."""
        return self.lisa_parameters(model, plan)

    def artifact_tensors(self, model: nn.Module, plan: LiSAPlan):
        """All new LiSA tensors (trained or not: the low-rank q starts random), never base weights."""
        return {n: p for n, p in self.lisa_parameters(model, plan)}

    def apply(self, model: nn.Module, plan: LiSAPlan, state: SharingState, applied: Applied) -> None:
        if plan.layers:
            require(model, REPLACE_ATTENTION, "LiSA")  # before anything changes
        spec, geo = arch_of(model), geometry(model)
        install(model)
        identity = list(range(geo.num_heads))
        for layer in sorted(plan.layers):
            donor = layer - 1
            if donor not in plan.layers:
                donor_module = attention(model, donor)
                hook = getattr(donor_module, "attnshare_hook", None)
                if isinstance(hook, Publisher):
                    hook.need_scores = True  # already a donor (SA): also publish scores
                elif hasattr(donor_module, "context"):
                    raise AttnshareError(
                        f"Layer {donor} reuses another layer's attention, so LiSA layer {layer} cannot read it; "
                        f"apply LiSA before other sharing or drop layer {layer}."
                    )
                else:
                    set_hook(donor_module, Publisher(state.context, donor, need_scores=True,
                                                     fused_prefill=plan.fused_prefill))
            base = attention(model, layer)
            fit = plan.fits.get(layer)
            start = fitted_start(base, spec, geo, fit) if fit else None  # before q/k leave
            path = f"{spec.layers}.{layer}.{spec.attn}"
            removable = [spec.q, spec.k] + (["q_norm", "k_norm"] if spec.qk_norm else [])
            detached = detach(base, path, removable, keep=state.keep_originals)
            module = LiSAAttention(
                base, spec.v, spec.o, layer, state.context, plan.head_map.get(layer, identity),
                hidden_size=geo.hidden_size, num_kv_heads=geo.num_kv_heads, head_dim=geo.head_dim, rank=plan.rank,
                ffn_width=plan.ffn_width, source=plan.source, rope=plan.rope,
                block_rows=BLOCK_ROWS if plan.fused_prefill else 0, frequencies=fit.frequencies if fit else None,
            )
            if start is not None:
                module.start_from(*start)
            set_attention(model, layer, module)
            state.context.add_edge(donor, layer)

            def undo(layer=layer, donor=donor, base=base, detached=detached):
                reattach(detached, state.base_state_dict)
                set_attention(model, layer, base)
                state.context.remove_consumer(layer)
                if not state.context.publishes(donor) and donor not in plan.layers:
                    clear_hook(attention(model, donor))

            applied.undo.append(undo)

    def fit(self, model: nn.Module, tokenizer, plan: LiSAPlan, config, teacher=None):
        """Apply, optionally fit each layer to the teacher's attention map (layer-local stage, at most two thirds
        of the time budget), then distil the unshared model end to end into the LiSA modules only: next-token KL,
        plus the attention-map KL of each LiSA layer when ``config.attention_kl_weight`` > 0."""
        apply(model, plan)
        teacher = teacher if teacher is not None else load_teacher(model)
        blocks = load_blocks(config, tokenizer, teacher=teacher)  # (N, T): the text is encoded once for every stage
        local: list[float] = []
        local_minutes = 0.0
        if plan.local_steps and not config.resume:  # a resumed run continues from a checkpoint made after it
            start = time.perf_counter()
            share = config.max_minutes * LOCAL_SHARE if config.max_minutes else None
            local = layer_local_fit(model, teacher, plan.layers, blocks, plan.local_steps, config, share,
                                    plan.local_repeats)
            local_minutes = (time.perf_counter() - start) / 60
            if config.max_minutes:
                config = dataclasses.replace(config, max_minutes=max(config.max_minutes - local_minutes, 0.05))
        objective = lisa_objective(model, teacher, plan.layers, config.distill_temperature,
                                   config.attention_kl_weight,
                                   distillation(teacher, config, data=blocks, preferred=self.distill_target))
        result = train_shared(model, tokenizer, config, teacher=teacher, objective=objective, data=blocks)
        if local:
            batches = -(-len(local) // plan.local_repeats)  # recorded teacher batches (each serves `repeats` steps)
            result.metrics.update({"local_steps": float(len(local)), "local_first": local[0], "local_last": local[-1],
                                   "local_minutes": local_minutes,
                                   "local_tokens": float(batches * config.batch_size * config.seq_len)})
        return result
