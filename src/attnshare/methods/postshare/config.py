"""Planning and training knobs for PostShare."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import AttnshareError
from ..directshare.config import DirectShareConfig

TRAIN_SCOPES = ("full", "attention", "pairs", "tied")
DATA_TERMS = ("distill", "lm")


@dataclass
class PostShareConfig(DirectShareConfig):
    """DirectShare after a post-training that pulls each replaced unit's weights towards its root's."""

    reg_weight: float = field(
        default=100.0,
        metadata={"help": "lambda: weight of the mean pair distance sum(||dWq||+||dWk||+||dWv||) for the pulling "
                          "scopes full, attention and pairs (measured: 100 with --lr 2e-3; the reference's 1 is for long "
                          "GPU runs); tied pairs share their slices, lambda = infinity"},
    )
    train_scope: str = field(
        default="tied",
        metadata={"help": f"what post-training updates: {', '.join(TRAIN_SCOPES)} (full: every weight; attention: every "
                          "layer's attention; pairs: only the q/k/v slices of the paired units; tied: DirectShare "
                          "first, then only the slices each pair shares, lambda = infinity)"},
    )
    data_term: str = field(
        default="distill",
        metadata={"help": f"data-fitting term: {' or '.join(DATA_TERMS)} (KL from the unshared model, or next-token LM)"},
    )
    guard_tokens: int = field(
        default=256,
        metadata={"help": "held-out calibration tokens on which the post-trained model must beat untrained DirectShare "
                          "(KL to the base), else DirectShare's weights are kept; post-training skips them (0: no check)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_training(self.reg_weight, self.train_scope, self.data_term, self.guard_tokens)


def check_training(reg_weight: float, train_scope: str, data_term: str, guard_tokens: int = 0) -> None:
    if not reg_weight >= 0:
        raise AttnshareError(f"--reg-weight must be zero or positive, got {reg_weight!r}.")
    if train_scope not in TRAIN_SCOPES:
        raise AttnshareError(f"--train-scope must be one of {', '.join(TRAIN_SCOPES)}, got {train_scope!r}.")
    if data_term not in DATA_TERMS:
        raise AttnshareError(f"--data-term must be one of {', '.join(DATA_TERMS)}, got {data_term!r}.")
    if not (isinstance(guard_tokens, int) and (guard_tokens == 0 or guard_tokens >= 2)):
        raise AttnshareError(f"--guard-tokens must be 0 (no check) or at least 2 tokens, got {guard_tokens!r}.")
