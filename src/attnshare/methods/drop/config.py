"""Planning knobs for drop (the attention sublayer of chosen layers removed)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...analysis.collect import SelectionConfig
from ...errors import AttnshareError

SCORES = ("loss", "influence")


@dataclass
class RemovalConfig(SelectionConfig):
    """What every removal baseline shares: explicit layers or a budget, and how layers are chosen."""

    layers: list[int] = field(
        default_factory=list,
        metadata={"help": "explicit layers: removed (drop: attention; layerdrop: whole blocks), or LiSA layers (lisa)"},
    )
    budget: int = field(default=0, metadata={"help": "number of layers the planner removes (0: use another budget)"})
    kv_saving: float = field(
        default=0.0, metadata={"help": "fraction of the KV cache to save; each removed layer saves 1/L (0: unused)"}
    )
    param_saving: float = field(
        default=0.0,
        metadata={"help": "fraction of the model's parameters to save: the fewest layers that save at least that"},
    )
    score: str = field(
        default="loss",
        metadata={"help": f"how layers are chosen: {' or '.join(SCORES)} (greedy on measured KL from the base, or "
                          "one pass of block influence 1 - cos(input, output), ShortGPT)", "choices": SCORES},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.budget, float):  # the CLI's shared --budget flag arrives as a float
            if not self.budget.is_integer():
                raise AttnshareError(f"The budget is a number of layers to remove; got {self.budget}.")
            self.budget = int(self.budget)
        if any(layer < 0 for layer in self.layers):
            raise AttnshareError(f"Layer {min(self.layers)} is not a layer index; pick layers from 0 up.")
        if len(set(self.layers)) != len(self.layers):
            twice = next(layer for layer in self.layers if self.layers.count(layer) > 1)
            raise AttnshareError(f"--layers lists layer {twice} twice; list each layer once.")
        given = [name for name, v in (("--layers", self.layers), ("--budget", self.budget),
                                      ("--kv-saving", self.kv_saving), ("--param-saving", self.param_saving)) if v]
        if len(given) > 1:
            raise AttnshareError(f"Give one of --layers, --budget, --kv-saving or --param-saving, not {' and '.join(given)}.")
        if self.budget < 0 or not 0.0 <= self.kv_saving < 1.0 or not 0.0 <= self.param_saving < 1.0:
            raise AttnshareError("--budget must be 0 or more, and --kv-saving and --param-saving must lie in [0, 1).")


@dataclass
class DropConfig(RemovalConfig):
    """Which layers lose their attention sublayer (q/k/v/o and their cache slot; the MLP stays).

    Budget: ``--budget N`` layers, ``--kv-saving F`` (each dropped layer saves 1/L of the KV cache) or
    ``--param-saving F`` (each saves its q/k/v/o).
    """
