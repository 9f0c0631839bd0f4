"""Training losses (pure functions) and the ready-made objectives built from them.

An *objective* is a callable ``(model, batch, teacher) -> (loss, metrics)`` where ``batch`` is
``{"input_ids": (B, T) LongTensor}``, ``loss`` is a scalar tensor with a graph to the trainable parameters and
``metrics`` is a dict of floats for logging. Methods plug their own loss into :func:`attnshare.training.train` this way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Objective = Callable[[Any, dict, Any], tuple[torch.Tensor, dict]]
Pair = tuple[torch.Tensor | Sequence[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]]


# --------------------------------------------------------------------------------------------------- pure losses


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats): position t predicts ``ids[:, t + 1]``.

    logits: (B, T, V); ids: (B, T) -> scalar.
    """
    pred = logits[:, :-1].float()  # (B, T-1, V)
    target = ids[:, 1:]  # (B, T-1)
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1))


def kl_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions softened by ``temperature``, mean per token.

    Multiplied by ``temperature**2`` so gradient size does not depend on the temperature (Hinton et al.); at
    temperature 1 it is the plain per-token KL in nats. student_logits, teacher_logits: (B, T, V) -> scalar.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, T, V)
    kl = (t.exp() * (t - s)).sum(-1)  # (B, T)
    return kl.mean() * temperature**2


def attention_map_kl(
    student_probs: torch.Tensor | Sequence[torch.Tensor],
    teacher_probs: torch.Tensor | Sequence[torch.Tensor],
    eps: float = 1e-8,
) -> torch.Tensor:
    """KL(teacher || student) between attention maps, mean over query rows, heads, batch and then layers.

    Each map is (B, H, Tq, Tk) with rows summing to 1 (masked keys are 0); a sequence means one map per layer.
    Teacher zeros contribute nothing; student probabilities are clamped at ``eps`` before the log.
    """
    if isinstance(student_probs, torch.Tensor):
        student_probs, teacher_probs = [student_probs], [teacher_probs]
    if len(student_probs) != len(teacher_probs) or not student_probs:
        raise ValueError("attention_map_kl needs the same non-zero number of student and teacher maps.")
    per_layer = []
    for s, t in zip(student_probs, teacher_probs):
        s, t = s.float(), t.float()  # (B, H, Tq, Tk)
        row_kl = (torch.xlogy(t, t) - t * s.clamp_min(eps).log()).sum(-1)  # (B, H, Tq)
        per_layer.append(row_kl.mean())
    return torch.stack(per_layer).mean()


def _as_tensors(x: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def pair_frobenius(pairs: Sequence[Pair] | Callable[[], torch.Tensor]) -> torch.Tensor:
    """Mean over pairs of the unsquared Frobenius norm of the weight difference (PostShare's regulariser).

    A pair is ``(a, b)`` with two tensors of one shape, or two equally long sequences of tensors (e.g. the q, k, v
    slices of two units): its value is then the sum of the norms, ``||a_q - b_q|| + ||a_k - b_k|| + ...``.
    A callable is called and its result returned, so a method can supply its own regulariser.
    """
    if callable(pairs):
        return pairs()
    if not pairs:
        raise ValueError("pair_frobenius needs at least one pair of weights.")
    values = []
    for a, b in pairs:
        a_list, b_list = _as_tensors(a), _as_tensors(b)
        if len(a_list) != len(b_list):
            raise ValueError("Both sides of a weight pair must hold the same number of tensors.")
        norms = [torch.linalg.vector_norm(x.float() - y.float()) for x, y in zip(a_list, b_list)]
        values.append(torch.stack(norms).sum())
    return torch.stack(values).mean()


# ---------------------------------------------------------------------------------------------------- objectives


def lm_objective(
    regularizer: Sequence[Pair] | Callable[[], torch.Tensor] | None = None, weight: float = 1.0
) -> Objective:
    """Next-token LM loss, plus ``weight * pair_frobenius(regularizer)`` when a regulariser is given (PostShare)."""

    def objective(model, batch: dict, teacher=None) -> tuple[torch.Tensor, dict]:
        ids = batch["input_ids"]  # (B, T)
        lm = lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
        if regularizer is None:
            return lm, {"lm": lm.item()}
        reg = pair_frobenius(regularizer)
        return lm + weight * reg, {"lm": lm.item(), "reg": reg.item()}

    return objective


def distill_objective(temperature: float = 1.0, attention_weight: float = 0.0) -> Objective:
    """KL distillation from ``teacher`` (run under no_grad), optionally plus per-layer attention-map KL.

    The attention term needs both models to return attention probabilities (``output_attentions=True``, eager).
    """

    def objective(model, batch: dict, teacher) -> tuple[torch.Tensor, dict]:
        if teacher is None:
            raise ValueError("distill_objective needs a teacher model.")
        ids = batch["input_ids"]  # (B, T)
        want_maps = attention_weight > 0
        with torch.no_grad():
            t_out = teacher(input_ids=ids, use_cache=False, output_attentions=want_maps)
        s_out = model(input_ids=ids, use_cache=False, output_attentions=want_maps)
        kl = kl_distill(s_out.logits, t_out.logits, temperature)
        if not want_maps:
            return kl, {"kl": kl.item()}
        att = attention_map_kl(s_out.attentions, t_out.attentions)
        return kl + attention_weight * att, {"kl": kl.item(), "attn_kl": att.item()}

    return objective
