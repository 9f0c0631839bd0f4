"""Training losses (pure functions) and the ready-made objectives built from them.

An *objective* is a callable ``(model, batch, teacher) -> (loss, metrics)`` where ``batch`` is
``{"input_ids": (B, T) LongTensor}``, ``loss`` is a scalar tensor with a graph to the trainable parameters and
``metrics`` is a dict of floats for logging. Methods plug their own loss into :func:`attnshare.training.train` this way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..hf_compat import head_input

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


def head_metric(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], weight: torch.Tensor, chunk: int = 256
                ) -> torch.Tensor:
    """Mean Fisher information of next-token distributions with respect to the LM head's input, (D,D) float32.

    ``M = E_t[J^T (diag p_t - p_t p_t^T) J]`` with ``J = c W`` the head's Jacobian (``c`` fitted by least squares
    from ``logits ~ c h W^T``: some families scale their logits); ``1/2 d^T M d`` is the KL, to second order, between
    the next-token distributions of head inputs ``h`` and ``h + d``. ``batches`` yields (hidden (..,D), logits (..,V))
    of the same tokens, weight (V,D) is the LM head. Costs N·V·D plus one V·D² product, once.
    """
    w = weight.detach().float()
    d = w.shape[1]
    mean_p = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    outer = torch.zeros(d, d, dtype=torch.float64, device=w.device)
    n, fit_num, fit_den = 0, 0.0, 0.0
    for hidden, logits in batches:
        hidden, logits = hidden.reshape(-1, d), logits.reshape(-1, w.shape[0])
        for start in range(0, hidden.shape[0], chunk):
            h, z = hidden[start : start + chunk].float(), logits[start : start + chunk].float()  # (n,D), (n,V)
            p = torch.softmax(z, -1)  # (n,V)
            mu = p @ w  # (n,D): E_p[W_v]
            mean_p += p.sum(0).double()
            outer += (mu.T @ mu).double()
            u = h @ w.T  # (n,V)
            fit_num += (u * z).sum().item()
            fit_den += (u * u).sum().item()
            n += h.shape[0]
    if n == 0:
        raise ValueError("head_metric needs at least one token.")
    c2 = (fit_num / fit_den) ** 2 if fit_den else 1.0
    spread = (w.T * (mean_p / n).float()) @ w  # (D,D): E_t[W^T diag(p_t) W]
    return (c2 * (spread.double() - outer / n)).float()


def hidden_kl(student: torch.Tensor, teacher: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """Second-order next-token KL between LM-head inputs, ``1/2 d^T M d`` with d = student - teacher, mean per token.

    student, teacher (B,T,D), metric (D,D) from :func:`head_metric` -> scalar. No vocabulary-sized tensor."""
    delta = (student.float() - teacher.float()).reshape(-1, student.shape[-1])  # (B*T, D)
    return 0.5 * ((delta @ metric) * delta).sum(-1).mean()


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


def distill_objective(temperature: float = 1.0, attention_weight: float = 0.0,
                      metric: torch.Tensor | None = None) -> Objective:
    """KL distillation from ``teacher`` (run under no_grad), optionally plus per-layer attention-map KL.

    With ``metric`` (:func:`head_metric`) the KL is the second-order one between LM-head inputs (:func:`hidden_kl`),
    so no vocabulary-sized logits are computed. The attention term needs both models to return attention
    probabilities (``output_attentions=True``, eager).
    """

    def objective(model, batch: dict, teacher) -> tuple[torch.Tensor, dict]:
        if teacher is None:
            raise ValueError("distill_objective needs a teacher model.")
        ids = batch["input_ids"]  # (B, T)
        want_maps = attention_weight > 0
        if metric is None:
            with torch.no_grad():
                t_out = teacher(input_ids=ids, use_cache=False, output_attentions=want_maps)
            s_out = model(input_ids=ids, use_cache=False, output_attentions=want_maps)
            kl = kl_distill(s_out.logits, t_out.logits, temperature)
        else:
            with torch.no_grad():
                t_h, t_out = head_input(teacher, ids, output_attentions=want_maps)
            s_h, s_out = head_input(model, ids, output_attentions=want_maps)
            kl = hidden_kl(s_h, t_h, metric.to(s_h.device))
        if not want_maps:
            return kl, {"kl": kl.item()}
        att = attention_map_kl(s_out.attentions, t_out.attentions)
        return kl + attention_weight * att, {"kl": kl.item(), "attn_kl": att.item()}

    return objective
