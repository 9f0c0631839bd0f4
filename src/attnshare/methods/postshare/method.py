"""PostShare: post-train so that matched units can share their weights, then share them (DirectShare, same pairs).

Scopes (``train_scope``): ``full``, ``attention`` and ``pairs`` train the unshared model with a pull between the
matched units' weights (``data term + lambda * R``, the paper's recipe) and share afterwards; ``tied`` (default)
shares first and trains the slices each pair now shares (the pull's limit, lambda = infinity), so every step works
on the model that will be kept. Measured on SmolLM2 (docs/results/directshare.md): with a CPU budget of minutes the
pull never closes, and Adam moves every weight it may train by about lr per step, so ``attention`` ends worse than
untrained DirectShare; ``pairs`` helps on some plans; ``tied`` helps on every plan measured.

Post-training is kept only when it helps: before training, untrained DirectShare's KL to the base model is measured
on held-out calibration tokens (``guard_tokens`` of the calibration text, which post-training does not read); after
training, the post-trained model's (shared with the same pairs). The lower KL wins; when DirectShare wins its
weights (the base's) are restored, so PostShare is never worse than DirectShare on the same plan on that text.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ...analysis.collect import calibration_blocks
from ...analysis.sensitivity import Divergence, Reference, divergence, forward_reference, plan_divergence
from ...analysis.weights import projection_weight
from ...arch import arch_of, attention, geometry
from ...data import load_text, tokenize_text
from ...models.loading import model_identity
from ...sharing.apply import apply
from ...sharing.state import STATE_ATTR, SharingState, state_of
from ...training import distill_objective, lm_objective, pair_frobenius, train
from ..directshare.loss_planner import HELDOUT_OFFSET, heldout_seq_len
from ..directshare.method import BANK, DirectShare, bank_rows, unit_slice
from ..directshare.plan import Pair, Part
from .config import PostShareConfig
from .plan import PostSharePlan

log = logging.getLogger(__name__)

REGULARISED = ("q", "k", "v")  # W_o is not pulled together (as in the reference)
GUARD_OFFSET = HELDOUT_OFFSET + 1024  # the check's tokens follow the planner's held-out tokens of the calibration text


def pair_slices(model: nn.Module, plan: PostSharePlan) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """For every (replaced, root) pair of every part, the live q/k/v slices both units share (views of the model's
    weights)."""
    geo, spec = geometry(model), arch_of(model)

    def slices(part: Part, layer: int, unit: int) -> list[torch.Tensor]:
        return [unit_slice(projection_weight(model, layer, k, spec), k, part.units(geo), unit)
                for k in REGULARISED if part.shares(k)]

    return [(slices(part, l, u), slices(part, rl, ru)) for part, pairs in plan.parts() for l, u, rl, ru in pairs]


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


def postshare_objective(model: nn.Module, plan: PostSharePlan, temperature: float, tied: bool = False):
    """The plan's data term (distillation at ``temperature`` or LM), plus ``lambda * R`` when it has pairs that
    are not ``tied`` already (tied pairs share their slices, so R is 0)."""
    if not plan.num_pairs or tied:
        return lm_objective() if plan.data_term == "lm" else distill_objective(temperature)
    reg = pair_regulariser(model, plan)
    if plan.data_term == "lm":
        return lm_objective(regularizer=reg, weight=plan.reg_weight)
    return regularised(distill_objective(temperature), reg, plan.reg_weight)


# ------------------------------------------------------------------------------------------------ what trains


def unit_row_mask(num_rows: int, num_units: int, chosen: set[int]) -> torch.Tensor:
    """(num_rows, 1) float mask of a projection split by output rows into ``num_units`` units: 1 on ``chosen``."""
    per_unit = torch.zeros(num_units)
    per_unit[sorted(chosen)] = 1.0
    return per_unit.repeat_interleave(num_rows // num_units).unsqueeze(1)  # (U*r, 1)


def paired_units(pairs: list[Pair]) -> dict[int, set[int]]:
    """Layer -> units that are replaced or a root in ``pairs``."""
    out: dict[int, set[int]] = {}
    for layer, unit, root_layer, root_unit in pairs:
        out.setdefault(layer, set()).add(unit)
        out.setdefault(root_layer, set()).add(root_unit)
    return out


def pair_masks(model: nn.Module, plan: PostSharePlan) -> dict[str, torch.Tensor]:
    """Gradient masks of ``train_scope="pairs"``: parameter name -> mask broadcastable to it, 1 on the q/k/v rows
    (and biases) of the paired units, 0 elsewhere."""
    spec, geo = arch_of(model), geometry(model)
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for part, pairs in plan.parts():
        for layer, chosen in sorted(paired_units(pairs).items()):
            attn = attention(model, layer)
            for kind in [k for k in REGULARISED if part.shares(k)]:
                proj = getattr(attn, getattr(spec, kind))
                mask = unit_row_mask(proj.weight.shape[0], part.units(geo), chosen)  # (U*r, 1)
                out[names[id(proj.weight)]] = mask
                if getattr(proj, "bias", None) is not None:
                    out[names[id(proj.bias)]] = mask[:, 0]  # (U*r,)
    return out


@contextmanager
def masked_gradients(params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """While active, the gradient of each parameter named in ``masks`` is multiplied by its mask (AdamW then leaves
    the masked-out entries unchanged, up to weight decay)."""
    hooks = [params[n].register_hook(lambda grad, mask=mask: grad * mask.to(grad)) for n, mask in masks.items()]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def tied_masks(model: nn.Module, plan: PostSharePlan) -> dict[str, torch.Tensor]:
    """Gradient masks of ``train_scope="tied"``, on a model shared by ``plan``: bank parameter name -> mask
    broadcastable to it, 1 on the bank rows of the roots (the slices each pair now shares), 0 elsewhere.

    Bank layout: q/k/v (N, r, D) and their biases (N, r) by rows, o (D, N, r) by its middle axis."""
    geo = geometry(model)
    out = {}
    for name, p in model.named_parameters():
        kind = name[len(BANK) + 1:].removesuffix("_bias") if name.startswith(BANK + ".") else None
        if kind not in ("q", "k", "v", "o"):  # not the bank, or a travelling q/k norm (not post-trained)
            continue
        part = plan.part_of(kind)
        rows = bank_rows(plan, part, geo)
        chosen = sorted({rows[root] for root in plan.roots_of(part).values()})
        axis = 1 if name == f"{BANK}.o" else 0
        mask = torch.zeros(p.shape[axis])
        mask[chosen] = 1.0
        shape = [1] * p.dim()
        shape[axis] = -1
        out[name] = mask.view(shape)  # (N, 1, 1), (N, 1) or (1, N, 1)
    return out


def postshare_trainable(model: nn.Module, scope: str, plan: PostSharePlan | None = None) -> list[str]:
    """Parameter names post-training updates: all of them, every layer's attention module, the paired layers'
    q/k/v projections (whose other rows :func:`pair_masks` keeps frozen), or (``tied``, on the shared model) the
    bank (whose rows other than the roots' :func:`tied_masks` keeps frozen)."""
    if scope == "full":
        return [n for n, _ in model.named_parameters()]
    if scope in ("pairs", "tied") and plan is not None and plan.num_pairs:
        return list(pair_masks(model, plan) if scope == "pairs" else tied_masks(model, plan))
    spec = arch_of(model)
    prefixes = tuple(f"{spec.layers}.{l}.{spec.attn}." for l in range(geometry(model).num_layers))
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


def scope_masks(model: nn.Module, plan: PostSharePlan) -> dict[str, torch.Tensor]:
    """The gradient masks of the plan's scope (none for full and attention, or without pairs)."""
    if not plan.num_pairs or plan.train_scope not in ("pairs", "tied"):
        return {}
    return pair_masks(model, plan) if plan.train_scope == "pairs" else tied_masks(model, plan)


# ----------------------------------------------------------------------------------------- keep the better one


def shared_divergence(model: nn.Module, plan: PostSharePlan, blocks: torch.Tensor,
                      reference: list[Reference]) -> Divergence:
    """KL to ``reference`` of ``model`` shared by ``plan`` as its weights are now (applied with kept originals, then
    undone), whatever sharing state the model carries meanwhile."""
    state = state_of(model)
    if state is not None:
        delattr(model, STATE_ATTR)
    try:
        return plan_divergence(model, plan, blocks, reference)
    finally:
        if state is not None:
            setattr(model, STATE_ATTR, state)


class Guard:
    """Untrained DirectShare's held-out KL, measured on the base model before post-training, to beat afterwards."""

    def __init__(self, model: nn.Module, plan: PostSharePlan, tokenizer=None) -> None:
        seq = heldout_seq_len(model, plan.guard_tokens)
        self.plan = plan
        self.blocks = calibration_blocks(model, plan.calib_text, plan.guard_tokens, seq, offset=GUARD_OFFSET,
                                         tokenizer=tokenizer)  # (N, T)
        self.reference = forward_reference(model, self.blocks)  # the base model's distributions
        self.directshare = shared_divergence(model, plan, self.blocks, self.reference)

    @property
    def skip(self) -> int:
        """Leading calibration-text tokens post-training must not read (the planner's and this check's)."""
        return GUARD_OFFSET + self.plan.guard_tokens

    def keeps_training(self, model: nn.Module, shared: bool = False) -> tuple[bool, Divergence]:
        """Whether the trained ``model`` (already ``shared`` by the plan, or still unshared) beats DirectShare."""
        trained = (divergence(model, self.blocks, self.reference) if shared else
                   shared_divergence(model, self.plan, self.blocks, self.reference))
        return trained.kl < self.directshare.kl, trained


def training_ids(tokenizer, text: str, max_tokens: int | None, skip: int) -> torch.Tensor:
    """Token ids (1-D) of ``text`` after its first ``skip`` tokens, at most ``max_tokens`` of them."""
    return tokenize_text(tokenizer, load_text(text), None if max_tokens is None else skip + max_tokens)[skip:]


class PostShare(DirectShare):
    name = "postshare"
    config_cls = PostShareConfig
    plan_cls = PostSharePlan

    def config_for_saving(self, model: nn.Module, kind: str, fraction: float) -> None:
        """None: PostShare is a training method (compare its trained artifacts with ``compare --artifacts``)."""

    def plan_for(self, model: nn.Module, config: PostShareConfig, shared: dict[str, list[Pair]]) -> PostSharePlan:
        plan = super().plan_for(model, config, shared)
        plan.reg_weight, plan.train_scope, plan.data_term = config.reg_weight, config.train_scope, config.data_term
        plan.guard_tokens, plan.calib_text = config.guard_tokens, config.calib_text
        return plan

    def fit(self, model: nn.Module, tokenizer, plan: PostSharePlan, config, teacher=None):
        """Train the unshared model with ``data term + lambda * R`` (both units of a pair trainable), then apply
        DirectShare with the same pairs; with ``train_scope="tied"``, apply DirectShare first and train the shared
        slices (lambda = infinity). The post-trained weights are kept only if they beat untrained DirectShare on
        held-out calibration tokens (see the module doc). The artifact then stores every trained tensor that
        survives sharing (none when DirectShare's weights are kept)."""
        if plan.data_term == "distill" and teacher is None:
            teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the unshared model, frozen
            if hasattr(teacher, STATE_ATTR):
                delattr(teacher, STATE_ATTR)
        guard = Guard(model, plan, tokenizer) if plan.guard_tokens and plan.num_pairs else None
        tied = plan.train_scope == "tied" and bool(plan.num_pairs)
        if tied:
            apply(model, plan)  # records the base identity too
        elif state_of(model) is None:  # record the base identity before training changes the weights
            setattr(model, STATE_ATTR, SharingState(identity=model_identity(model)))
        # "pairs"/"tied" with no pair (ratio 0) have nothing of their own to train: they train the attention
        names = postshare_trainable(model, plan.train_scope, plan)
        params = dict(model.named_parameters())
        masks = scope_masks(model, plan)
        before = {n: params[n].detach().clone() for n in names} if guard is not None or masks else {}
        objective = postshare_objective(model, plan, config.distill_temperature, tied)
        data = None
        if guard is not None and config.text == plan.calib_text:  # never train on the check's tokens
            data = training_ids(tokenizer, config.text, config.max_tokens, guard.skip)
        fingerprint = hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
        log.info("post-training %d tensors (%s, %s), %d pairs", len(names), plan.train_scope, plan.data_term,
                 plan.num_pairs)
        with masked_gradients(params, masks):
            result = train(model, objective, config, teacher if plan.data_term == "distill" else None,
                           trainable=names, tokenizer=tokenizer, data=data, fingerprint=fingerprint)
        with torch.no_grad():  # masked-out rows stay exactly as they were (weight decay could move them)
            for n, mask in masks.items():
                params[n].copy_(torch.where(mask.to(params[n]).bool(), params[n], before[n].to(params[n])))
        keep = True
        if guard is not None:
            keep, trained = guard.keeps_training(model, shared=tied)
            log.info("PostShare check on %d held-out calibration tokens: KL to base %.4f post-trained vs %.4f "
                     "untrained DirectShare; keeping %s", guard.blocks.numel(), trained.kl, guard.directshare.kl,
                     "the post-trained weights" if keep else "DirectShare (the base weights)")
            result.metrics.update({"check_kl_postshare": trained.kl, "check_kl_directshare": guard.directshare.kl,
                                   "kept_postshare": float(keep)})
            if not keep:
                with torch.no_grad():
                    for n in names:
                        params[n].copy_(before[n].to(params[n]))
        if not tied:
            apply(model, plan)
        if keep:
            params = dict(model.named_parameters())
            state = state_of(model)
            state.trained.update(n for n in names if n in params)
            state.trained.update(n for n in params if n.startswith(BANK + "."))
        return result
