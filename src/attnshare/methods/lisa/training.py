"""LiSA's training objective: next-token KL from the unshared teacher, plus optional attention-map KL per layer."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ...arch import attention
from ...methods.base import state_of
from ...training.losses import Objective, attention_map_kl, kl_distill


def load_teacher(model: nn.Module) -> nn.Module:
    """The unshared base model, reloaded from the identity recorded when the plan was applied."""
    from ...models import load_model

    identity = state_of(model).identity
    teacher, _ = load_model(identity["base_model"], dtype=next(model.parameters()).dtype,
                            num_layers=identity["num_layers"])
    return teacher


@contextmanager
def capture_maps(modules: dict[int, nn.Module]):
    """Record each module's returned attention map (output[1], (B,H,T,S)) by layer for one forward."""
    maps: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _a, out, layer=layer: maps.__setitem__(layer, out[1]))
               for layer, m in modules.items()]
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()


def lisa_objective(model: nn.Module, teacher: nn.Module, layers: list[int], temperature: float = 1.0,
                   attention_weight: float = 0.0) -> Objective:
    """KL(teacher || student) of next-token distributions (+ ``attention_weight`` x mean attention-map KL of the
    LiSA layers). With the map term, the teacher runs eager attention so it returns its probabilities."""
    want_maps = attention_weight > 0
    if want_maps:
        teacher.set_attn_implementation("eager")
    student_modules = {layer: attention(model, layer) for layer in layers}
    teacher_modules = {layer: attention(teacher, layer) for layer in layers}

    def objective(wrapped, batch: dict, teacher_model) -> tuple[torch.Tensor, dict]:
        ids = batch["input_ids"]  # (B, T)
        with torch.no_grad(), capture_maps(teacher_modules if want_maps else {}) as t_maps:
            t_logits = teacher_model(input_ids=ids, use_cache=False).logits
        with capture_maps(student_modules if want_maps else {}) as s_maps:
            s_logits = wrapped(input_ids=ids, use_cache=False).logits
        kl = kl_distill(s_logits, t_logits, temperature)
        if not want_maps:
            return kl, {"kl": kl.item()}
        att = attention_map_kl([s_maps[layer] for layer in layers], [t_maps[layer] for layer in layers])
        return kl + attention_weight * att, {"kl": kl.item(), "attn_kl": att.item()}

    return objective
