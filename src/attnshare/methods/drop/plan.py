"""The drop plan: the layers whose attention sublayer is removed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...arch import Geometry
from ...errors import AttnshareError
from ...plan import UNCHANGED, Plan, check_layer


@dataclass
class DropPlan(Plan):
    method = "drop"

    layers: list[int] = field(default_factory=list)  # layers whose attention is gone

    def validate(self, geo: Geometry) -> None:
        for layer in self.layers:
            check_layer(layer, geo, "dropped")
        if len(set(self.layers)) != len(self.layers):
            raise AttnshareError("The drop plan lists a layer twice; list each dropped layer once.")

    def first_changed_layer(self) -> int:
        return min(self.layers, default=UNCHANGED)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "layers": sorted(self.layers)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DropPlan:
        return cls(layers=sorted(int(layer) for layer in data.get("layers", [])))

    def summary(self) -> str:
        return f"drop: attention of {len(self.layers)} layers ({', '.join(map(str, sorted(self.layers)))})"
