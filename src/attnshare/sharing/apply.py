"""Apply plans to a model in place (every plan validated before anything changes) and undo them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..arch import geometry
from ..attention.dispatch import uninstall, use_gqa_sdpa
from ..hf_compat import attn_implementation, warn_if_untested
from ..models.loading import model_identity
from ..plan import Plan
from .registry import get_method
from .state import STATE_ATTR, Applied, SharingState, state_of

log = logging.getLogger(__name__)


def apply(model: nn.Module, plans: Plan | list[Plan], *, keep_originals: bool = False) -> nn.Module:
    """Apply one or more plans in order, in place. Every plan is validated before anything changes.

    Args:
        keep_originals: keep removed weights in memory so :func:`unapply` needs no reload (no memory saving).
    """
    warn_if_untested()
    plans = plans if isinstance(plans, list) else [plans]
    geo = geometry(model)
    for plan in plans:
        plan.validate(geo)
    state = state_of(model)
    if state is None:
        state = SharingState(identity=model_identity(model), keep_originals=keep_originals)
        setattr(model, STATE_ATTR, state)
    for plan in plans:
        applied = Applied(plan)
        get_method(plan.method).apply(model, plan, state, applied)
        for earlier in state.applied:
            get_method(earlier.plan.method).settle(model, earlier.plan, state)
        state.applied.append(applied)
        log.info("applied %s", plan.summary())
    return model


def unapply(model: nn.Module) -> nn.Module:
    """Undo every applied plan, restoring the base modules (weights reloaded from the base if they were freed)."""
    state = state_of(model)
    if state is None:
        return model
    for applied in reversed(state.applied):
        for undo in reversed(applied.undo):
            undo()
    state.context.clear()
    uninstall(model)
    delattr(model, STATE_ATTR)
    return model


def applied_plans(model: nn.Module) -> list[Plan]:
    state = state_of(model)
    return [a.plan for a in state.applied] if state else []


def use_fast_path(model: nn.Module) -> None:
    """Switch ``model`` (shared or not) to the attention of the compiled fast path (bench and generate
    ``--compile``): SDPA that maps query heads onto KV heads inside the kernel (HF's copies a static cache's K/V per
    query head at every compiled decode step), and, on a shared model, kernels compiled once per process for eager
    prefill blocks (LiSA's head FFN; the first long prefill waits for that compile)."""
    use_gqa_sdpa(model)
    state = state_of(model)
    if state is not None:
        state.context.fused_kernels = True


@contextmanager
def fast_path_restored(models: list[nn.Module]) -> Iterator[None]:
    """Whatever :func:`use_fast_path` does to the models inside, each runs as before afterwards."""
    states = [state_of(m) for m in models]
    before = [(attn_implementation(m), s is not None and s.context.fused_kernels) for m, s in zip(models, states)]
    try:
        yield
    finally:
        for model, state, (name, fused) in zip(models, states, before):
            if attn_implementation(model) != name:
                model.set_attn_implementation(name)
            if state is not None:
                state.context.fused_kernels = fused
