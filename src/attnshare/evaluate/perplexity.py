"""Token-level perplexity over non-overlapping windows (SPEC §6)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..data import load_text, token_blocks, tokenize_text
from ..errors import AttnshareError
from ..progress import progress_bar


@dataclass
class PerplexityConfig:
    """How perplexity is measured; compare methods only under the same protocol."""

    text: str = field(default="britannica", metadata={"help": "named text (britannica, hamlet, pyref; plays is for calibration) or a file"})
    window: int = field(default=1024, metadata={"help": "tokens per non-overlapping window"})
    max_tokens: int = field(default=16384, metadata={"help": "use the first N tokens of the text"})
    batch_size: int = field(default=4, metadata={"help": "windows per forward pass"})

    def __post_init__(self) -> None:
        if self.window < 2 or self.max_tokens < 2 or self.batch_size < 1:
            raise AttnshareError("window and max_tokens must be at least 2 and batch_size at least 1.")


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean next-token negative log-likelihood (nats)
    tokens: int  # predicted tokens
    windows: int
    window: int
    text: str

    def to_dict(self) -> dict:
        return asdict(self)


def window_nll(model, blocks: torch.Tensor, batch_size: int, progress: bool = True) -> tuple[float, int]:
    """Summed next-token NLL and predicted-token count over ``blocks`` (N, T), each window scored independently."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    batches = range(0, blocks.shape[0], batch_size)
    with torch.inference_mode():
        for start in progress_bar(batches, desc="perplexity", unit="batch", show=progress, leave=False):
            ids = blocks[start : start + batch_size].to(device)  # (b, T)
            logits = model(ids, use_cache=False).logits[:, :-1].float()  # (b, T-1, V)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += ids[:, 1:].numel()
    return total, count


def ppl_from_nll(nll: float) -> float:
    """exp(mean NLL), capped at exp(700) ~ 1e304: a broken model reads as huge, not as an OverflowError."""
    return math.exp(min(nll, 700.0))


def check_context(model, window: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and window > limit:
        raise AttnshareError(f"A window of {window} tokens is longer than the model's context of {limit}; use --window {limit} or less.")


def perplexity(model, tokenizer, config: PerplexityConfig | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on the first ``max_tokens`` tokens of a text, in non-overlapping windows."""
    config = config or PerplexityConfig()
    check_context(model, config.window)
    ids = tokenize_text(tokenizer, load_text(config.text), config.max_tokens)
    blocks = token_blocks(ids, config.window)
    total, count = window_nll(model, blocks, config.batch_size, progress)
    nll = total / count
    return PerplexityResult(ppl_from_nll(nll), nll, count, blocks.shape[0], config.window, config.text)
