"""Planning knobs for SA."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...analysis.collect import SelectionConfig
from ...errors import AttnshareError
from ...plan import check_layer_list


@dataclass
class SAConfig(SelectionConfig):
    """How SA chooses receivers and donors.

    Budget: ``--budget N`` asks the planner for N receiver layers (each saves its q/k projections and its K cache,
    1/(2L) of the KV cache); ``--kv-saving F`` asks instead for the fewest receivers that save a fraction F of the
    KV cache. The planner measures candidate plans (KL on held-out calibration tokens) and keeps the best.
    """

    receivers: list[int] = field(
        default_factory=list,
        metadata={"help": "explicit receiver layers; each reuses the nearest earlier non-receiver of its kind"},
    )
    budget: int = field(
        default=0,
        metadata={"help": "number of receiver layers the planner chooses, 1..L-1 (0: use --receivers or --kv-saving)"},
    )
    kv_saving: float = field(
        default=0.0,
        metadata={"help": "fraction of the KV cache to save, in (0, 0.5); each receiver saves 1/(2L) (0: unused)"},
    )
    align_heads: bool = field(
        default=False, metadata={"help": "map receiver heads to their best-matching donor heads (training-free extension)"}
    )
    fused_prefill: bool = field(
        default=True, metadata={"help": "prefill receivers with fused SDPA over the donor's Q/K instead of materialised probabilities"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.budget, float):  # the CLI's shared --budget flag may arrive as a float
            if not self.budget.is_integer():
                raise AttnshareError(f"The SA budget is a number of receiver layers; got {self.budget}.")
            self.budget = int(self.budget)
        if self.budget < 0:
            raise AttnshareError("--budget must be 0 or a positive number of receiver layers.")
        if not 0.0 <= self.kv_saving < 0.5:
            raise AttnshareError(f"--kv-saving must lie in [0, 0.5) (SA removes at most the K half of the cache); got {self.kv_saving}.")
        check_layer_list(self.receivers, "--receivers", "Receiver layer", "has no earlier non-receiver layer to reuse")
        if self.receivers and (self.budget or self.kv_saving):
            raise AttnshareError("Give either --receivers (explicit layers) or --budget/--kv-saving (planned), not both.")
        if self.budget and self.kv_saving:
            raise AttnshareError("Give either --budget (receivers) or --kv-saving (fraction of the KV cache), not both.")
