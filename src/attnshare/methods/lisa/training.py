"""LiSA's training objective: next-token KL from the unshared teacher, plus optional attention-map KL per layer."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

from ...arch import attention
from ...attention.context import DonorState
from ...attention.dispatch import clear_hook, install, set_hook, uninstall
from ...attention.functional import attention_scores, eager_attention, softmax_probs
from ...hf_compat import head_input
from ...models.loading import load_base
from ...sharing.state import state_of
from ...training.loop import batch_indices
from ...training.losses import Objective, attention_map_kl, hidden_kl, kl_distill

log = logging.getLogger(__name__)


def load_teacher(model: nn.Module) -> nn.Module:
    """The unshared base model, reloaded from the identity recorded when the plan was applied."""
    teacher, _ = load_base(state_of(model).identity, dtype=next(model.parameters()).dtype)
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
                   attention_weight: float = 0.0, metric: torch.Tensor | None = None) -> Objective:
    """KL(teacher || student) of next-token distributions (+ ``attention_weight`` x mean attention-map KL of the
    LiSA layers). With ``metric`` the KL is the second-order one between LM-head inputs, so no vocabulary-sized
    logits are computed (:func:`attnshare.training.losses.hidden_kl`). With the map term, the teacher runs eager
    attention so it returns its probabilities."""
    want_maps = attention_weight > 0
    if want_maps:
        teacher.set_attn_implementation("eager")
    student_modules = {layer: attention(model, layer) for layer in layers}
    teacher_modules = {layer: attention(teacher, layer) for layer in layers}

    def objective(wrapped, batch: dict, teacher_model) -> tuple[torch.Tensor, dict]:
        ids = batch["input_ids"]  # (B, T)
        with torch.no_grad(), capture_maps(teacher_modules if want_maps else {}) as t_maps:
            if metric is None:
                t_logits = teacher_model(input_ids=ids, use_cache=False).logits
            else:
                t_hidden, _ = head_input(teacher_model, ids)
        with capture_maps(student_modules if want_maps else {}) as s_maps:
            if metric is None:
                kl = kl_distill(wrapped(input_ids=ids, use_cache=False).logits, t_logits, temperature)
            else:
                s_hidden, _ = head_input(wrapped, ids)
                kl = hidden_kl(s_hidden, t_hidden, metric.to(s_hidden.device))
        if not want_maps:
            return kl, {"kl": kl.item()}
        att = attention_map_kl([s_maps[layer] for layer in layers], [t_maps[layer] for layer in layers])
        return kl + attention_weight * att, {"kl": kl.item(), "attn_kl": att.item()}

    return objective


# ------------------------------------------------------------------------------------ layer-local first stage


class Recorder:
    """Attention hook (see attention/dispatch.py) that records a teacher layer's masked scores and probabilities
    (and its post-RoPE q/k and scaling, which the fitted start reads)."""

    def __init__(self, layer: int, store: dict[int, DonorState]) -> None:
        self.layer, self.store = layer, store

    def __call__(self, module, fn, q, k, v, mask, scaling=None, dropout=0.0, **kwargs):
        scaling = module.scaling if scaling is None else scaling
        scores = attention_scores(q, k, mask, scaling, kwargs.get("softcap"))  # (B,H,T,S) float32
        probs = softmax_probs(scores, q.dtype)
        self.store[self.layer] = DonorState(probs=probs, scores=scores, q=q, k=k, mask=mask, scaling=scaling)
        out, _ = eager_attention(module, q, k, v, mask, scaling, dropout, probs=probs)
        return out, None


@contextmanager
def recording(teacher: nn.Module, layers: list[int]):
    """Record, for one teacher forward, the attention of ``layers`` and the inputs of their attention modules."""
    maps: dict[int, DonorState] = {}
    inputs: dict[int, dict] = {}
    install(teacher)
    handles = []
    for layer in layers:
        module = attention(teacher, layer)
        set_hook(module, Recorder(layer, maps))
        handles.append(module.register_forward_pre_hook(
            lambda _m, _a, kw, layer=layer: inputs.__setitem__(layer, kw), with_kwargs=True))
    try:
        yield maps, inputs
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            clear_hook(attention(teacher, layer))
        uninstall(teacher)


def local_loss(model: nn.Module, layers: list[int], maps: dict[int, DonorState], inputs: dict[int, dict]) -> torch.Tensor:
    """Mean over LiSA layers of KL(teacher map || layer map), each layer fed the teacher's own donor attention
    and input (teacher forcing), so the layers' fits are independent."""
    student, target = [], []
    for layer in layers:
        module = attention(model, layer)
        kw = inputs[layer]
        q, k = module.low_rank(kw["hidden_states"], kw.get("position_embeddings"))
        scores = module.scores(maps[layer - 1], q, k, kw.get("attention_mask"))  # (B,H,T,S)
        student.append(softmax_probs(scores, scores.dtype))
        target.append(maps[layer].probs)
    return attention_map_kl(student, target)


def layer_local_fit(model: nn.Module, teacher: nn.Module, layers: list[int], blocks: torch.Tensor, steps: int,
                    config, minutes: float | None = None, repeats: int = 1) -> list[float]:
    """First stage: fit every LiSA layer to the teacher's attention map at that layer (AdamW, ``config.lr``).

    blocks (N, T) are the training blocks; batches follow the training loop's seeded order. Each recorded teacher
    batch serves ``repeats`` optimizer steps (the teacher forward is the expensive part; the LM head is skipped).
    Stops after ``steps`` optimizer steps or ``minutes``. Returns the loss per step.
    """
    import time

    from ...progress import progress_bar

    params = [p for n, p in model.named_parameters() if ".lisa_" in n]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    need = sorted(set(layers) | {layer - 1 for layer in layers})
    device = next(teacher.parameters()).device
    start, losses = time.perf_counter(), []
    bar = progress_bar(range(steps), desc="lisa local", unit="step", show=config.progress)
    for step in bar:
        if step % repeats == 0:
            batch = batch_indices(blocks.shape[0], step // repeats, 0, 0, 1, config.batch_size, 1, config.seed + 1)
            with torch.no_grad(), recording(teacher, need) as (maps, inputs):
                teacher.get_decoder()(input_ids=blocks[batch].to(device), use_cache=False)
        loss = local_loss(model, layers, maps, inputs)
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if minutes is not None and time.perf_counter() - start > minutes * 60:
            log.info("layer-local stage stopped at step %d: its %.3g-minute share is spent", step + 1, minutes)
            break
    bar.close()
    log.info("layer-local stage: %d steps, attention KL %.4f -> %.4f", len(losses), losses[0], losses[-1])
    return losses
