"""Planning knobs for mix."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...analysis.collect import SelectionConfig
from ...errors import AttnshareError


@dataclass
class MixConfig(SelectionConfig):
    """Per-layer choice among keep, SA receiver and drop, by greedy selection on measured KL.

    Budget: ``--kv-saving F`` (an SA receiver saves 1/(2L) of the KV cache, a dropped layer 1/L) or
    ``--param-saving F`` (a receiver saves its q/k, a dropped layer its q/k/v/o).
    """

    kv_saving: float = field(default=0.0, metadata={"help": "fraction of the KV cache to save, in (0, 1)"})
    param_saving: float = field(default=0.0, metadata={"help": "fraction of the model's parameters to save, in (0, 1)"})
    align_heads: bool = field(default=True, metadata={"help": "SA receivers use head maps to their donors' heads"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if bool(self.kv_saving) == bool(self.param_saving):
            raise AttnshareError("mix needs exactly one budget: --kv-saving F or --param-saving F.")
        if not 0.0 <= self.kv_saving < 1.0 or not 0.0 <= self.param_saving < 1.0:
            raise AttnshareError("--kv-saving and --param-saving must lie in (0, 1).")
