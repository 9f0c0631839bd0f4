"""Calibration tokens, and streaming capture of per-layer attention probabilities through the attention seam.

Probabilities are computed from the layer's own post-RoPE q/k (SDPA never returns them) one layer at a time and
handed to a sink; nothing here keeps them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch import attention, geometry
from ..attention.dispatch import clear_hook, install, set_hook, uninstall
from ..attention.functional import attention_probs, eager_attention
from ..data import load_text, token_blocks
from ..errors import AttnshareError
from ..models.loading import resolve
from ..sharing.state import state_of

log = logging.getLogger(__name__)

EVAL_TEXTS = ("britannica", "hamlet", "pyref")  # evaluation texts: calibration and planning never read them


def check_calibration_text(text: str) -> None:
    """Calibration and planning never read the evaluation texts."""
    if text in EVAL_TEXTS:
        raise AttnshareError(
            f"'{text}' is an evaluation text; calibrate and plan on 'plays' (or your own file) instead."
        )


def check_base_model(model: nn.Module) -> None:
    """Analysis and planning run on the unshared base model."""
    geometry(model)  # unsupported architectures fail here with the list of supported ones
    if state_of(model) is not None:
        raise AttnshareError(
            "This model already has sharing applied; analyze and plan on the base model (attnshare.unapply it first)."
        )


def model_tokenizer(model: nn.Module):
    """The tokenizer of a model loaded by :func:`attnshare.load_model`, or None (e.g. a random test model)."""
    base = getattr(model.config, "attnshare_base", None)
    if not base:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve(base))
    except (OSError, ValueError):
        return None


def calibration_ids(model: nn.Module, text: str = "plays", tokens: int = 1024, offset: int = 0,
                    tokenizer=None) -> torch.Tensor:
    """Tokens ``[offset, offset + tokens)`` of a calibration text (1-D LongTensor).

    Uses ``tokenizer`` or the model's own; a model without a tokenizer (a random test model) reads the text's UTF-8
    bytes modulo its vocabulary, which is deterministic and enough for random weights.
    """
    check_calibration_text(text)
    body = load_text(text)
    need = offset + tokens
    tokenizer = tokenizer if tokenizer is not None else model_tokenizer(model)
    if tokenizer is None:
        log.warning("no tokenizer for this model: calibration reads the text's bytes modulo the vocabulary")
        ids = torch.tensor(list(body.encode("utf-8")[:need]), dtype=torch.long) % model.config.vocab_size
    else:
        chars = need * 6 + 1024  # tokenise a prefix only: the plays are millions of characters
        while True:
            ids = tokenizer(body[:chars], add_special_tokens=True, return_attention_mask=False)["input_ids"]
            if len(ids) >= need or chars >= len(body):
                break
            chars *= 2
        ids = torch.tensor(ids[:need], dtype=torch.long)
    if ids.numel() < need:
        raise AttnshareError(
            f"The text '{text}' has {ids.numel()} tokens, fewer than the {need} needed; use a longer text or fewer tokens."
        )
    return ids[offset:need]


def calibration_blocks(model: nn.Module, text: str = "plays", tokens: int = 1024, seq_len: int = 512,
                       offset: int = 0, tokenizer=None) -> torch.Tensor:
    """``tokens // seq_len`` blocks (N, seq_len) of calibration text starting at token ``offset``."""
    if seq_len < 2 or tokens < seq_len:
        raise AttnshareError(f"Calibration needs seq_len >= 2 and tokens >= seq_len (got {tokens} and {seq_len}).")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise AttnshareError(f"A sequence of {seq_len} tokens is longer than the model's context of {limit}; use --seq-len {limit} or less.")
    return token_blocks(calibration_ids(model, text, tokens, offset, tokenizer), seq_len)  # (N, T)


class Recorder:
    """Attention hook that computes a layer's probabilities from its q/k, passes them to a sink, returns the output."""

    def __init__(self, layer: int, sink: Callable[[int, torch.Tensor], None]) -> None:
        self.layer = layer
        self.sink = sink

    def __call__(self, module, fn, q, k, v, mask, scaling=None, dropout=0.0, **kwargs):
        scaling = module.scaling if scaling is None else scaling
        softcap = kwargs.get("softcap")
        probs = attention_probs(q, k, mask, scaling, softcap)  # (B,H,T,S)
        self.sink(self.layer, probs)
        out, _ = eager_attention(module, q, k, v, mask, scaling, dropout, softcap, probs=probs)
        return out, None


@contextmanager
def record_attention(model: nn.Module, sink: Callable[[int, torch.Tensor], None],
                     layers: list[int] | None = None) -> Iterator[None]:
    """While active, every forward calls ``sink(layer, probs (B,H,T,S))`` for each of ``layers`` (default all)."""
    check_base_model(model)
    layers = list(range(geometry(model).num_layers)) if layers is None else layers
    install(model)
    try:
        for layer in layers:
            set_hook(attention(model, layer), Recorder(layer, sink))
        yield
    finally:
        for layer in layers:
            clear_hook(attention(model, layer))
        uninstall(model)


# Arithmetic of the candidate forwards a planner measures (see sensitivity.measurement_precision).
PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass
class CalibrationConfig:
    """Calibration knobs every measuring planner shares (mixed into the methods' configs, so the flags are one)."""

    calib_text: str = field(default="plays", metadata={"help": "calibration text for planners (never an evaluation text)"})
    calib_tokens: int = field(default=1024, metadata={"help": "calibration tokens (held-out tokens follow them)"})
    calib_seq_len: int = field(default=512, metadata={"help": "calibration sequence length"})
    heldout_tokens: int = field(
        default=512, metadata={"help": "held-out calibration tokens on which planners measure the KL of candidate plans"}
    )
    measure_precision: str = field(
        default="auto", metadata={"help": "arithmetic of the candidate forwards planners measure (the base's reference "
                                          "stays float32); auto: bfloat16 autocast where the device multiplies bf16 "
                                          "natively, else float32", "choices": list(PRECISIONS)}
    )

    def __post_init__(self) -> None:
        check_calibration_text(self.calib_text)
        if self.calib_tokens < 2 or self.heldout_tokens < 2 or self.calib_seq_len < 2:
            raise AttnshareError("Calibration and held-out token counts and the sequence length must be at least 2.")
        if self.measure_precision not in PRECISIONS:
            raise AttnshareError(f"--measure-precision must be {' or '.join(PRECISIONS)}; "
                                 f"got {self.measure_precision!r}.")


@dataclass
class SelectionConfig(CalibrationConfig):
    """Calibration knobs of the planners that select a plan by greedy search over measured candidates."""

    screen_tokens: int = field(
        default=128, metadata={"help": "planners first measure every candidate alone on this many held-out tokens, "
                                       "then the shortlist on all of them (0: all of them from the start)"}
    )
    shortlist: int = field(
        default=0, metadata={"help": "candidates kept for greedy selection after single measurement (0: budget + 8)"}
    )
    greedy_width: int = field(
        default=0, metadata={"help": "options a greedy step measures: the best so far (lazy greedy; 0: all of them)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shortlist < 0 or self.greedy_width < 0:
            raise AttnshareError("--shortlist and --greedy-width must be zero or more.")
        if self.screen_tokens == 1 or self.screen_tokens < 0:
            raise AttnshareError(f"--screen-tokens must be 0 (off) or at least 2; got {self.screen_tokens}.")
