"""Planning knobs for SA."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import AttnshareError


@dataclass
class SAConfig:
    """How SA chooses receivers and donors."""

    receivers: list[int] = field(
        default_factory=list,
        metadata={"help": "explicit receiver layers; each reuses the nearest earlier non-receiver of its kind"},
    )
    budget: int = field(default=0, metadata={"help": "number of receiver layers the planner chooses (0: use --receivers)"})
    align_heads: bool = field(
        default=False, metadata={"help": "map receiver heads to their best-matching donor heads (training-free extension)"}
    )
    fused_prefill: bool = field(
        default=True, metadata={"help": "prefill receivers with fused SDPA over the donor's Q/K instead of materialised probabilities"}
    )

    def __post_init__(self) -> None:
        if self.budget < 0:
            raise AttnshareError("--budget must be 0 or a positive number of receiver layers.")
