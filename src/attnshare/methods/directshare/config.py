"""Planning knobs for DirectShare."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...analysis.collect import check_calibration_text
from ...analysis.weights import DEFAULT_MATCH, MATCH_FUNCTIONS, check_match
from ...errors import AttnshareError
from .plan import GRANULARITIES, NORM_RULES, check_norms

SELECT_RULES = ("loss", "cosine")


@dataclass
class DirectShareConfig:
    """Which attention units (heads, or KV groups under GQA) reuse the weights of an earlier unit.

    ``--select loss`` (default) measures on held-out calibration tokens which units cost least to replace and which
    earlier unit each should reuse; ``--select cosine`` is the paper's data-free rule (highest best-match cosine).
    """

    ratio: float = field(
        default=0.3,
        metadata={"help": "fraction of all attention units (L x units per layer) replaced by an earlier unit"},
    )
    select: str = field(
        default="loss",
        metadata={"help": "how units and donors are chosen: loss (measured on held-out calibration tokens: each "
                          "unit's donor by its layer's output change, units by their KL when replaced alone) or "
                          "cosine (the paper: highest best-match weight cosine)", "choices": list(SELECT_RULES)},
    )
    match: str = field(
        default=DEFAULT_MATCH,
        metadata={"help": f"weight slices compared by cosine (select=cosine; with loss only the order of unmeasured "
                          f"donors): {', '.join(MATCH_FUNCTIONS)}"},
    )
    granularity: str = field(
        default="group",
        metadata={"help": "what one unit is: group (a KV group: its query heads' W_q with the KV head's W_k/W_v) or "
                          "split (each query head's W_q and each KV head's W_k/W_v are units of their own; "
                          "select=loss; the ratio is then a fraction of the q/k/v parameters)",
                  "choices": list(GRANULARITIES)},
    )
    norms: str = field(
        default="donor",
        metadata={"help": "q/k norms (per-head RMSNorms: Qwen3, Gemma-3) of a layer whose every query (key) unit "
                          "reuses units of one earlier layer: donor (that layer's norm travels with its weights, "
                          "stored once; on Gemma-3-270M two layers' worth gave ppl x1.34 instead of x1.50) or own "
                          "(the layer keeps its norm)",
                  "choices": list(NORM_RULES)},
    )
    share_o: bool = field(default=False, metadata={"help": "also share the unit's o_proj columns (the reference code does)"})
    calib_text: str = field(
        default="plays", metadata={"help": "calibration text for planners (never an evaluation text)"}
    )
    loss_tokens: int = field(
        default=256,
        metadata={"help": "select=loss: held-out calibration tokens (after the first 1024) on which units are measured"},
    )
    donor_pool: int = field(
        default=0,
        metadata={"help": "select=loss: earlier units measured as donors of each unit, its N best by cosine (0: all)"},
    )
    greedy: int = field(
        default=0,
        metadata={"help": "select=loss: greedy confirmation, each step the best of the next N units by single-unit "
                          "KL on the measured KL of the whole plan (0: take the N lowest single-unit KLs)"},
    )

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_match(self.match)
        if self.select not in SELECT_RULES:
            raise AttnshareError(f"--select must be one of {', '.join(SELECT_RULES)}, got {self.select!r}.")
        if self.granularity not in GRANULARITIES:
            raise AttnshareError(f"--granularity must be {' or '.join(GRANULARITIES)}, got {self.granularity!r}.")
        if self.granularity == "split" and self.select == "cosine":
            raise AttnshareError("--granularity split needs --select loss: the cosine rule (the paper's) ranks whole "
                                 "KV-group units.")
        if self.granularity == "split" and self.greedy:
            raise AttnshareError("--greedy confirms KV-group units one at a time; use it with --granularity group.")
        check_norms(self.norms)
        check_calibration_text(self.calib_text)
        if not (isinstance(self.loss_tokens, int) and self.loss_tokens >= 2):
            raise AttnshareError(f"--loss-tokens must be a whole number of at least 2 tokens, got {self.loss_tokens!r}.")
        if self.donor_pool < 0 or self.greedy < 0:
            raise AttnshareError("--donor-pool and --greedy must be zero or positive whole numbers.")


def check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, int | float) and 0 <= ratio < 1):
        raise AttnshareError(f"--ratio must be in [0, 1) (the fraction of units to share), got {ratio!r}.")
