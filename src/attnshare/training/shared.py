"""Train a shared model: the parameters each applied method declares trainable, by distillation from the base."""

from __future__ import annotations

import hashlib
import json
import logging

import torch

from ..errors import AttnshareError
from ..hf_compat import head_input
from ..models.loading import load_base
from ..sharing.registry import get_method
from ..sharing.state import state_of
from .loop import TrainConfig, TrainResult, load_blocks, train
from .losses import Objective, distill_objective, head_metric

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


METRIC_TOKENS = 2048  # training tokens the teacher's head metric is averaged over (--distill-target hidden)


def teacher_head_metric(teacher, blocks: torch.Tensor, tokens: int = METRIC_TOKENS, batch: int = 4) -> torch.Tensor:
    """The teacher's mean next-token Fisher metric (D,D) on the head inputs of the first ``tokens`` tokens of the
    training ``blocks`` (N,T): the same blocks on every process and on resume, so the loss is the same."""
    device = next(teacher.parameters()).device
    rows = blocks[: max(1, tokens // blocks.shape[1])]

    def batches():
        with torch.no_grad():
            for chunk in rows.split(batch):
                hidden, out = head_input(teacher, chunk.to(device), logits=True)
                yield hidden, out.logits

    return head_metric(batches(), teacher.get_output_embeddings().weight)


def distillation(teacher, config: TrainConfig, tokenizer=None, data=None, preferred: str = "logits"
                 ) -> torch.Tensor | None:
    """The head metric when distillation matches LM-head inputs, else None (logits are distilled).

    ``config.distill_target`` decides; "auto" takes the methods' ``preferred`` target ("hidden" is second-order
    at temperature 1, so a temperature other than 1 keeps the logits)."""
    target = config.distill_target
    if target == "auto":
        target = preferred if config.distill_temperature == 1.0 else "logits"
    if target != "hidden":
        return None
    log.info("distilling LM-head inputs under the teacher's Fisher metric (%d tokens)", METRIC_TOKENS)
    return teacher_head_metric(teacher, load_blocks(config, tokenizer, data, teacher))


def preferred_target(model) -> str:
    """"hidden" when every applied method prefers distilling LM-head inputs, else "logits"."""
    methods = [get_method(a.plan.method) for a in state_of(model).applied]
    return "hidden" if methods and all(m.distill_target == "hidden" for m in methods) else "logits"


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
    if data is None:
        data = load_blocks(config, tokenizer, teacher=teacher)  # (N, T): encoded once, for the head metric and training
    if objective is None:
        metric = distillation(teacher, config, tokenizer, data, preferred_target(model))
        objective = distill_objective(config.distill_temperature, config.attention_kl_weight, metric)
    log.info("training %d tensors (%d parameters)", len(names),
             sum(p.numel() for n, p in model.named_parameters() if n in set(names)))
    result = train(model, objective, config, teacher, trainable=names, tokenizer=tokenizer, data=data,
                   fingerprint=plans_fingerprint(model))
    state.trained.update(names)
    return result
