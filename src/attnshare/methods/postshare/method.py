"""PostShare: post-train with a pull between matched units' weights, then share them (DirectShare, same pairs)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable

import torch
from torch import nn

from ...analysis.weights import projection_weight, units
from ...arch import arch_of, geometry
from ...models.loading import model_identity
from ...sharing.apply import apply
from ...sharing.state import STATE_ATTR, SharingState, state_of
from ...training import distill_objective, lm_objective, pair_frobenius, train
from ..directshare.method import BANK, DirectShare, unit_slice
from .config import PostShareConfig
from .plan import PostSharePlan

log = logging.getLogger(__name__)

REGULARISED = ("q", "k", "v")  # W_o is not pulled together (as in the reference)


def pair_slices(model: nn.Module, plan: PostSharePlan) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """For every (replaced, root) pair, the live q/k/v slices of both units (views of the model's weights)."""
    num_units = units(geometry(model))
    spec = arch_of(model)

    def slices(layer: int, unit: int) -> list[torch.Tensor]:
        return [unit_slice(projection_weight(model, layer, k, spec), k, num_units, unit) for k in REGULARISED]

    return [(slices(l, u), slices(rl, ru)) for l, u, rl, ru in plan.pairs]


def pair_regulariser(model: nn.Module, plan: PostSharePlan) -> Callable[[], torch.Tensor]:
    """``R = mean over pairs of (||dWq|| + ||dWk|| + ||dWv||)``, unsquared Frobenius, slicing live weights per call."""
    return lambda: pair_frobenius(pair_slices(model, plan))


def regularised(data_objective, regulariser: Callable[[], torch.Tensor], weight: float):
    """``loss = data term + weight * R`` as a training objective."""

    def objective(model, batch: dict, teacher=None):
        loss, metrics = data_objective(model, batch, teacher)
        reg = regulariser()
        return loss + weight * reg, {**metrics, "reg": reg.item()}

    return objective


def postshare_trainable(model: nn.Module, scope: str) -> list[str]:
    """Parameter names post-training updates: all of them, or every layer's attention module."""
    if scope == "full":
        return [n for n, _ in model.named_parameters()]
    spec = arch_of(model)
    prefixes = tuple(f"{spec.layers}.{l}.{spec.attn}." for l in range(geometry(model).num_layers))
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


class PostShare(DirectShare):
    name = "postshare"
    config_cls = PostShareConfig
    plan_cls = PostSharePlan

    def make_plan(self, model: nn.Module, config: PostShareConfig) -> PostSharePlan:
        plan = super().make_plan(model, config)
        plan.reg_weight, plan.train_scope, plan.data_term = config.reg_weight, config.train_scope, config.data_term
        return plan

    def fit(self, model: nn.Module, tokenizer, plan: PostSharePlan, config, teacher=None):
        """Train the unshared model with ``data term + lambda * R`` (both units of a pair trainable), then apply
        DirectShare with the same pairs. The artifact then stores every trained tensor that survives sharing."""
        if plan.data_term == "distill" and teacher is None:
            teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the unshared model, frozen
            if hasattr(teacher, STATE_ATTR):
                delattr(teacher, STATE_ATTR)
        if state_of(model) is None:  # record the base identity before training changes the weights
            setattr(model, STATE_ATTR, SharingState(identity=model_identity(model)))
        names = postshare_trainable(model, plan.train_scope)
        if plan.pairs:
            reg = pair_regulariser(model, plan)
            objective = (lm_objective(regularizer=reg, weight=plan.reg_weight) if plan.data_term == "lm" else
                         regularised(distill_objective(config.distill_temperature), reg, plan.reg_weight))
        else:
            objective = lm_objective() if plan.data_term == "lm" else distill_objective(config.distill_temperature)
        fingerprint = hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
        log.info("post-training %d tensors (%s, %s), %d pairs", len(names), plan.train_scope, plan.data_term,
                 len(plan.pairs))
        result = train(model, objective, config, teacher if plan.data_term == "distill" else None, trainable=names,
                       tokenizer=tokenizer, fingerprint=fingerprint)
        apply(model, plan)
        params = dict(model.named_parameters())
        state = state_of(model)
        state.trained.update(n for n in names if n in params)
        state.trained.update(n for n in params if n.startswith(BANK + "."))
        return result
