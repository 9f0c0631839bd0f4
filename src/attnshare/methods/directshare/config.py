"""Planning knobs for DirectShare."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...analysis.weights import DEFAULT_MATCH, MATCH_FUNCTIONS, check_match
from ...errors import AttnshareError


@dataclass
class DirectShareConfig:
    """Which attention units (heads, or KV groups under GQA) reuse the weights of their best earlier match."""

    ratio: float = field(
        default=0.3,
        metadata={"help": "fraction of all attention units (L x units per layer) replaced by their best earlier match"},
    )
    match: str = field(
        default=DEFAULT_MATCH,
        metadata={"help": f"weight slices compared by cosine to find matches: {', '.join(MATCH_FUNCTIONS)}"},
    )
    share_o: bool = field(default=False, metadata={"help": "also share the unit's o_proj columns (the reference code does)"})

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_match(self.match)


def check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, int | float) and 0 <= ratio < 1):
        raise AttnshareError(f"--ratio must be in [0, 1) (the fraction of units to share), got {ratio!r}.")
