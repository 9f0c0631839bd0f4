"""Train a shared model: the parameters each applied method declares trainable, by distillation from the base."""

from __future__ import annotations

import hashlib
import json
import logging

from ..errors import AttnshareError
from ..models.loading import load_base
from ..sharing.registry import get_method
from ..sharing.state import state_of
from .loop import TrainConfig, TrainResult, train
from .losses import Objective, distill_objective

log = logging.getLogger(__name__)


def plans_fingerprint(model) -> str:
    """A short hash of the applied plans: a checkpoint made for other plans is refused on resume."""
    state = state_of(model)
    payload = json.dumps([a.plan.to_dict() for a in state.applied], sort_keys=True) if state else ""
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def trainable_names(model) -> list[str]:
    state = state_of(model)
    if state is None or not state.applied:
        raise AttnshareError("This model has no sharing applied; apply a plan before training it.")
    names: list[str] = []
    for applied in state.applied:
        names += [n for n, _ in get_method(applied.plan.method).trainable_parameters(model, applied.plan)]
    if not names:
        raise AttnshareError("The applied methods declare nothing to train; use a method with trainable parts.")
    return names


def train_shared(model, tokenizer, config: TrainConfig | None = None, teacher=None,
                 objective: Objective | None = None, data=None) -> TrainResult:
    """Distil the unshared ``teacher`` into the shared ``model``, training only what the methods declare.

    Without ``teacher``, the base model is reloaded from the identity recorded when the plans were applied.
    Trained tensors are remembered on the model's sharing state, so :func:`attnshare.save` stores them.
    """
    config = config or TrainConfig()
    names = trainable_names(model)
    state = state_of(model)
    if teacher is None:
        teacher, _ = load_base(state.identity, dtype=next(model.parameters()).dtype)
    objective = objective or distill_objective(config.distill_temperature, config.attention_kl_weight)
    log.info("training %d tensors (%d parameters)", len(names),
             sum(p.numel() for n, p in model.named_parameters() if n in set(names)))
    result = train(model, objective, config, teacher, trainable=names, tokenizer=tokenizer, data=data,
                   fingerprint=plans_fingerprint(model))
    state.trained.update(names)
    return result
