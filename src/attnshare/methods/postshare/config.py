"""Planning and training knobs for PostShare."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import AttnshareError
from ..directshare.config import DirectShareConfig

TRAIN_SCOPES = ("full", "attention")
DATA_TERMS = ("distill", "lm")


@dataclass
class PostShareConfig(DirectShareConfig):
    """DirectShare after a post-training that pulls each replaced unit's weights towards its root's."""

    reg_weight: float = field(
        default=100.0,
        metadata={"help": "lambda: weight of the mean pair distance sum(||dWq||+||dWk||+||dWv||) (measured: 100 with "
                          "--lr 2e-3; the reference's 1 is for long GPU runs)"},
    )
    train_scope: str = field(
        default="attention",
        metadata={"help": f"what post-training updates: {' or '.join(TRAIN_SCOPES)} (every layer's attention only)"},
    )
    data_term: str = field(
        default="distill",
        metadata={"help": f"data-fitting term: {' or '.join(DATA_TERMS)} (KL from the unshared model, or next-token LM)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_training(self.reg_weight, self.train_scope, self.data_term)


def check_training(reg_weight: float, train_scope: str, data_term: str) -> None:
    if not reg_weight >= 0:
        raise AttnshareError(f"--reg-weight must be zero or positive, got {reg_weight!r}.")
    if train_scope not in TRAIN_SCOPES:
        raise AttnshareError(f"--train-scope must be one of {', '.join(TRAIN_SCOPES)}, got {train_scope!r}.")
    if data_term not in DATA_TERMS:
        raise AttnshareError(f"--data-term must be one of {', '.join(DATA_TERMS)}, got {data_term!r}.")
