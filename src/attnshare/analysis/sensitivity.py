"""Sensitivity: how much the next-token distribution moves when a sharing plan is applied.

Plans are applied with :func:`attnshare.sharing.apply.apply` (``keep_originals=True``, so undoing needs no reload) and undone
after each measurement; the reference log-probabilities of the unshared model are computed once.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import decoder_layers, geometry
from ..errors import AttnshareError
from ..evaluate.perplexity import ppl_from_nll
from ..hf_compat import decoder_layer_output
from ..plan import UNCHANGED, Plan
from ..progress import progress_bar
from ..sharing.apply import apply, unapply
from .collect import (
    PRECISIONS,
    CalibrationConfig,
    SelectionConfig,
    calibration_blocks,
    check_base_model,
    model_tokenizer,
)


@dataclass
class Divergence:
    """KL(base || shared) of next-token distributions (nats, mean over tokens) and the shared model's ppl."""

    kl: float
    ppl: float


@dataclass
class Reference:
    """The base model's next-token distribution on one block, kept as log-probabilities and probabilities so KL is
    one subtraction and one dot product per measurement (no exponential)."""

    logp: torch.Tensor  # (T-1, V) float32
    probs: torch.Tensor  # (T-1, V) float32, exp(logp)

    @classmethod
    def of(cls, logp: torch.Tensor) -> Reference:
        return cls(logp, logp.exp())

    def head(self, tokens: int) -> Reference:
        """The reference of the block's first ``tokens`` tokens (a causal model's first rows are unchanged)."""
        return Reference(self.logp[: tokens - 1], self.probs[: tokens - 1])

    def kl_sum(self, logp: torch.Tensor) -> float:
        """Σ_t KL(p_ref,t || p_t) for log-probs ``logp`` (T-1, V) of the same block (overwritten)."""
        # per entry log p_ref - log p, so small KLs do not cancel; the clamp keeps 0 * inf (no reference mass
        # where the shared model has none) from turning into NaN
        gap = logp.clamp_(min=-1e30).neg_().add_(self.logp)  # (T-1, V)
        return torch.dot(self.probs.flatten(), gap.flatten()).item()


def fast_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (CUDA with bf16, or a CPU with AVX512-BF16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        supported = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return bool(supported and supported())
    return False


def measurement_precision(precision: str, model: nn.Module) -> Callable[[], object]:
    """A context factory for the candidate forwards of a probe: bf16 autocast ("bfloat16", or "auto" on a device
    with native bf16 matmuls) of a float32 model, else nothing. Reference distributions stay float32, so a plan's
    KL differs from the float32 one by the rounding of its forward only."""
    if precision not in PRECISIONS:
        raise AttnshareError(f"Unknown measurement precision {precision!r}; use one of {', '.join(PRECISIONS)}.")
    param = next(model.parameters())
    if param.dtype != torch.float32 or precision == "float32" or (
            precision == "auto" and not fast_bfloat16(param.device)):
        return nullcontext
    return lambda: torch.autocast(param.device.type, dtype=torch.bfloat16)


def block_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities of one block: ids (T,) -> (T-1, V) float32 on the CPU."""
    device = next(model.parameters()).device
    logits = model(ids[None].to(device), use_cache=False).logits[0, :-1].float()  # (T-1, V)
    return F.log_softmax(logits, dim=-1).cpu()


def forward_reference(model: nn.Module, blocks: torch.Tensor) -> list[Reference]:
    """The base model's :class:`Reference` per block: blocks (N, T) -> N references."""
    with torch.inference_mode():
        return [Reference.of(block_logprobs(model, ids)) for ids in blocks]


def divergence(model: nn.Module, blocks: torch.Tensor, reference: list[Reference],
               precision: Callable[[], object] = nullcontext) -> Divergence:
    """KL from ``reference`` (the base model's distributions on ``blocks``) to ``model``'s, and ``model``'s ppl;
    ``model``'s forwards run inside ``precision()`` (see :func:`measurement_precision`)."""
    kl, nll, count = 0.0, 0.0, 0
    with torch.inference_mode(), precision():
        for ids, ref in zip(blocks, reference):
            logp = block_logprobs(model, ids)  # (T-1, V)
            nll += F.nll_loss(logp, ids[1:], reduction="sum").item()
            kl += ref.kl_sum(logp)
            count += ids.numel() - 1
    return Divergence(kl / count, ppl_from_nll(nll / count))


def plan_divergence(model: nn.Module, plan: Plan | list[Plan], blocks: torch.Tensor, reference: list[Reference],
                    prefix: list[torch.Tensor] | None = None,
                    precision: Callable[[], object] = nullcontext) -> Divergence:
    """Apply ``plan`` to the (base) ``model``, measure :func:`divergence`, and undo it (the model ends unchanged).

    ``prefix[l]`` (N,T,D), the base model's input to decoder layer l on ``blocks``, lets the layers below the plan's
    first changed layer be replayed instead of recomputed (they compute exactly what the base computes).
    """
    plans = plan if isinstance(plan, list) else [plan]
    first = min((p.first_changed_layer() for p in plans), default=UNCHANGED)
    apply(model, plans, keep_originals=True)
    try:
        with replayed_prefix(model, prefix, first):
            return divergence(model, blocks, reference, precision)
    finally:
        unapply(model)


class Passthrough(nn.Module):
    """A decoder layer not recomputed: hidden states (B,T,D) pass through unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return decoder_layer_output(hidden_states)


class Replay(nn.Module):
    """The last replayed layer: returns the recorded input of the next layer, one block (1,T,D) per call in order."""

    def __init__(self, inputs: torch.Tensor) -> None:
        super().__init__()
        self.inputs, self.calls = inputs, 0  # (N,T,D)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = self.inputs[self.calls % len(self.inputs)][None].to(hidden_states)  # (1,T,D)
        self.calls += 1
        return decoder_layer_output(out)


@contextmanager
def replayed_prefix(model: nn.Module, prefix: list[torch.Tensor] | None, first: int):
    """Within the block, decoder layers 0..first-1 are replaced by a replay of the base's recorded activations."""
    layers = decoder_layers(model)
    first = min(first, len(layers) - 1)
    if prefix is None or first < 1:
        yield
        return
    originals = [layers[i] for i in range(first)]
    for i in range(first - 1):
        layers[i] = Passthrough()
    layers[first - 1] = Replay(prefix[first])
    try:
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def reference_and_inputs(model: nn.Module, blocks: torch.Tensor) -> tuple[list[Reference], list[torch.Tensor]]:
    """One base forward per block (N,T): its :class:`Reference` per block and its input to every decoder layer
    (L tensors (N,T,D), kept on the CPU)."""
    layers = decoder_layers(model)
    seen: list[list[torch.Tensor]] = [[] for _ in layers]

    def record(index: int):
        def hook(module, args, kwargs):
            seen[index].append(hidden_input(args, kwargs).detach().cpu())  # (1,T,D)
        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        reference = forward_reference(model, blocks)
    finally:
        for handle in handles:
            handle.remove()
    return reference, [torch.cat(inputs) for inputs in seen]


def hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states (B,T,D) a decoder layer was called with (a pre-hook's ``args``/``kwargs``)."""
    return args[0] if args else kwargs["hidden_states"]


def run_hooked(model: nn.Module, blocks: torch.Tensor, handles: list) -> None:
    """One no-cache forward per block (N,T) for the hooks behind ``handles``, which are removed afterwards."""
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for ids in blocks:
                model(ids[None].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


class Probe:
    """Measures candidate plans on one base model: held-out calibration blocks and their reference log-probs.

    The held-out tokens follow the first ``tokens`` calibration tokens of ``text`` (never an evaluation text).
    ``screen`` > 0 (and fewer than the held-out tokens) adds a cheaper measurement on the first ``screen`` of them
    (``measure(..., screen=True)``; whole blocks only once it spans more than one), for a first pass over many
    candidates. ``precision`` (see :func:`measurement_precision`) is the arithmetic of the candidate forwards.
    """

    def __init__(self, model: nn.Module, *, text: str = "plays", tokens: int = 1024, seq_len: int = 512,
                 heldout: int = 512, screen: int = 0, precision: str = "float32", progress: bool = False,
                 tokenizer=None) -> None:
        check_base_model(model)
        self.precision = measurement_precision(precision, model)
        self.model, self.text, self.tokens, self.seq_len, self.progress = model, text, tokens, seq_len, progress
        self.tokenizer = tokenizer if tokenizer is not None else model_tokenizer(model)
        self.geo = geometry(model)
        self.heldout = calibration_blocks(model, text, heldout, min(seq_len, heldout), offset=tokens,
                                          tokenizer=self.tokenizer)  # (N, T)
        # the base's distributions, and its layer inputs L x (N,T,D): layers below a plan are replayed
        self.reference, self.prefix = reference_and_inputs(model, self.heldout)
        self.screen = first_tokens(self.heldout, self.reference, self.prefix, screen) if screen else None
        self.measured = 0

    @classmethod
    def of(cls, model: nn.Module, config: CalibrationConfig, progress: bool = False, *,
           seq_len: int | None = None) -> Probe:
        """A probe with a planner's calibration settings (text, tokens, held-out tokens, precision, and a
        :class:`SelectionConfig`'s screening budget); ``seq_len`` overrides the config's sequence length."""
        screen = config.screen_tokens if isinstance(config, SelectionConfig) else 0
        return cls(model, text=config.calib_text, tokens=config.calib_tokens, seq_len=seq_len or config.calib_seq_len,
                   heldout=config.heldout_tokens, screen=screen, precision=config.measure_precision,
                   progress=progress)

    def measure(self, plans: Plan | list[Plan], *, screen: bool = False) -> Divergence:
        """KL from the base and ppl of the model with ``plans`` applied (the model ends unchanged); with ``screen``
        on the screening tokens only (all held-out tokens when the probe has none)."""
        self.measured += 1
        blocks, reference, prefix = (self.screen if screen and self.screen else
                                     (self.heldout, self.reference, self.prefix))
        return plan_divergence(self.model, plans, blocks, reference, prefix, self.precision)

    def screener(self, measure: Callable[[list, bool], Divergence]) -> Callable[[list], Divergence] | None:
        """``measure(items, screen)`` as the screening measurement :func:`greedy_select` takes, if there is one."""
        return (lambda items: measure(items, True)) if self.screen else None


def first_tokens(blocks: torch.Tensor, reference: list[Reference], prefix: list[torch.Tensor],
                 tokens: int) -> tuple[torch.Tensor, list[Reference], list[torch.Tensor]] | None:
    """The held-out view of the first ``tokens`` tokens: blocks (N,T), references and layer inputs L x (N,T,D) cut
    to them (whole blocks once ``tokens`` >= T); None where that is all of them (nothing cheaper to screen on)."""
    count, seq = blocks.shape
    if tokens >= count * seq:
        return None
    if tokens >= seq:
        n = tokens // seq
        return blocks[:n], reference[:n], [p[:n] for p in prefix]
    return blocks[:1, :tokens], [reference[0].head(tokens)], [p[:1, :tokens] for p in prefix]


@dataclass
class Step:
    """One step of a greedy selection: the items chosen so far and the divergence of the plan they make."""

    chosen: list
    score: Divergence


def greedy_select(measure: Callable[[list], Divergence], candidates: list, count: int, *,
                  valid: Callable[[list], list] | None = None, shortlist: int = 0, width: int = 0,
                  screen: Callable[[list], Divergence] | None = None, progress: bool = False,
                  desc: str = "greedy selection") -> list[Step]:
    """Greedy forward selection of ``count`` items, by the measured divergence of the whole plan.

    Every candidate is first measured alone (by ``screen`` where given, a cheaper measurement whose shortlist is
    then measured again by ``measure``); the ``shortlist`` best (0: count + 8) stay in the running; then items
    are added one at a time, each time the one whose addition gives the smallest KL (ties: the smallest item).
    With ``width`` > 0 a step measures only the ``width`` options that did best last time they were measured (lazy
    greedy: far fewer measurements, the same choice whenever the options' order does not change much).
    ``valid(chosen)`` lists the items that may join ``chosen`` (default: any not chosen). Returns one
    :class:`Step` per size 1..count, so the selections for smaller counts are prefixes of the largest one.
    """
    valid = valid or (lambda chosen: [c for c in candidates if c not in chosen])
    single = {c: (screen or measure)([c])
              for c in progress_bar(candidates, desc=f"{desc}: single", unit="candidate", show=progress, leave=False)}
    keep = sorted(candidates, key=lambda c: (single[c].kl, c))[:max(shortlist or count + 8, count)]
    if screen:
        single = {c: measure([c]) for c in progress_bar(keep, desc=f"{desc}: shortlist", unit="candidate",
                                                         show=progress, leave=False)}
        keep.sort(key=lambda c: (single[c].kl, c))
    last = {c: single[c].kl for c in keep}  # each option's KL when it was last measured
    best = keep[0]
    steps = [Step([best], single[best])]
    bar = progress_bar(total=count - 1, desc=desc, unit="step", show=progress and count >= 2, leave=False)
    while len(steps) < count:
        chosen = steps[-1].chosen
        options = sorted((c for c in valid(chosen) if c in keep), key=lambda c: (last[c], c))
        if not options:
            raise AttnshareError(f"No valid choice is left after {chosen}; ask for a smaller budget.")
        trials = {c: measure([*chosen, c]) for c in (options[:width] if width else options)}
        last.update({c: d.kl for c, d in trials.items()})
        best = min(trials, key=lambda c: (trials[c].kl, c))
        steps.append(Step([*chosen, best], trials[best]))
        bar.update()
    bar.close()
    return steps
