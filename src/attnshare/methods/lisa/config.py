"""Planning knobs for LiSA (the open choices of the paper are plan fields, so an artifact rebuilds them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...analysis.collect import CalibrationConfig
from ...errors import AttnshareError
from ...plan import check_layer_list
from .plan import INITS, SOURCES


@dataclass
class LiSAConfig(CalibrationConfig):
    """How LiSA chooses its layers and shapes its modules (calibration: layer sensitivity on the held-out tokens,
    head maps and the fitted start on the calibration tokens)."""

    layers: list[int] = field(
        default_factory=list, metadata={"help": "explicit LiSA layers (each reuses layer l-1); default: --fraction"}
    )
    fraction: float = field(
        default=0.53, metadata={"help": "fraction of layers made LiSA layers, chosen by sensitivity (shallow kept)"}
    )
    rank: int = field(
        default=0, metadata={"help": "per-head width r of the low-rank q/k (0: head_dim/6 rounded to even, ~6x smaller Q+K)"}
    )
    ffn_width: int = field(
        default=2, metadata={"help": "hidden width of the head-alignment FFN as a multiple of H (0: linear only)"}
    )
    source: str = field(
        default="scores", metadata={"help": "donor attention the FFN reads: pre-softmax scores or probabilities",
                                    "choices": list(SOURCES)}
    )
    rope: bool = field(default=True, metadata={"help": "rotary position embedding on the low-rank q/k"})
    align_heads: bool = field(
        default=True, metadata={"help": "initialise the FFN to the best head permutation (else identity)"}
    )
    init: str = field(
        default="fit", metadata={"help": "how LiSA layers start: fitted in closed form on calibration text (fit: the "
                                          "layer's own q/k rows of its most useful rotary frequencies plus a "
                                          "least-squares head mixing), or aligned sharing (permutation)",
                                 "choices": list(INITS)}
    )
    fused_prefill: bool = field(
        default=True, metadata={"help": "gradient-free prefill in query blocks over the donor's SDPA Q/K instead of "
                                        "whole materialised score maps"}
    )
    local_steps: int = field(
        default=32, metadata={"help": "layer-local first stage: steps fitting each layer to the teacher's attention map "
                                     "(at most 2/3 of --minutes), before end-to-end distillation"}
    )
    local_repeats: int = field(
        default=4, metadata={"help": "layer-local stage: optimizer steps per recorded teacher batch"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.fraction < 1.0:
            raise AttnshareError(f"--fraction must be between 0 and 1 (exclusive), got {self.fraction}.")
        check_layer_list(self.layers, "--layers", "LiSA layer", "has no previous layer to share from")
        if self.rank < 0 or self.ffn_width < 0 or self.local_steps < 0 or self.local_repeats < 1:
            raise AttnshareError("--rank, --ffn-width and --local-steps must be zero or positive, --local-repeats >= 1.")
        if self.source not in SOURCES:
            raise AttnshareError(f"--source must be one of {', '.join(SOURCES)}, got '{self.source}'.")
        if self.init not in INITS:
            raise AttnshareError(f"--init must be one of {', '.join(INITS)}, got '{self.init}'.")
        if self.init == "fit" and (self.source != "scores" or not self.rope):
            raise AttnshareError("--init fit (the default) reproduces the layers' rotated scores, so it needs --source "
                                 "scores and RoPE; add --init permutation to use --source probs or --no-rope.")


def default_rank(head_dim: int) -> int:
    """About 6x fewer Q+K parameters than the originals (the paper's compression), even for RoPE."""
    return max(2, (head_dim // 6) // 2 * 2)
