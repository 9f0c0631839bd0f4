"""Apply plans to a model in place (every plan validated before anything changes) and undo them."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..arch import geometry
from ..attention.dispatch import uninstall, use_gqa_sdpa
from ..hf_compat import attn_implementation, warn_if_untested
from ..models.loading import model_identity
from ..plan import Plan
from .registry import get_method
from .state import STATE_ATTR, Applied, SharingState, state_of

log = logging.getLogger(__name__)

# Inductor settings of the compiled fast path on CPU (inference only): the weights are frozen into the graph and each
# GEMM is autotuned between inductor's C++ micro-kernels and ATen's (MKL). On the 2-core AVX2 box MKL runs the 4-row
# GEMMs of a batch-4 decode step at a fifth of the memory bandwidth, and a compiled base step goes from 169 to 97 ms
# (docs/results/bench.md). Costs: a longer first compile, and the graph holds a packed copy of the weights. The
# autotuner's tables of timings (written to stderr for every GEMM shape) are not shown.
CPU_COMPILE_SETTINGS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                        "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}


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


@contextmanager
def fast_path_compiling(device: torch.device, autotune: bool = True) -> Iterator[None]:
    """In force while the fast path's graphs compile (their first calls, or a ``generate`` that compiles its decode
    step): :data:`CPU_COMPILE_SETTINGS` on CPU with ``autotune``, inductor's defaults otherwise. Frozen weights need
    gradients off."""
    if device.type != "cpu" or not autotune:
        yield
        return
    from torch._inductor import config as inductor_config

    with inductor_config.patch(CPU_COMPILE_SETTINGS), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # torch 2.13's autotuner, harmless
        yield


def compile_fast_path(forward: Callable, device: torch.device, autotune: bool = True) -> Callable:
    """``forward`` as one graph per input shape (``fullgraph``, static shapes), compiled under
    :func:`fast_path_compiling` whenever a call compiles."""
    compiled = torch.compile(forward, fullgraph=True, dynamic=False)

    @functools.wraps(forward)
    def call(*args, **kwargs):
        with fast_path_compiling(device, autotune):
            return compiled(*args, **kwargs)

    return call
