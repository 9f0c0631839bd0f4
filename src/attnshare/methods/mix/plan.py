"""The mix plan: dropped layers and SA receivers (with donors and head maps), applied as drop then SA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...arch import Geometry
from ...errors import AttnshareError
from ...plan import Plan, int_keys
from ..drop.plan import DropPlan
from ..sa.plan import SAPlan


@dataclass
class MixPlan(Plan):
    method = "mix"

    drop: list[int] = field(default_factory=list)  # layers whose attention is removed
    donors: dict[int, int] = field(default_factory=dict)  # SA receiver -> donor (never a dropped layer)
    head_map: dict[int, list[int]] = field(default_factory=dict)  # SA receiver -> donor head of each head

    def parts(self) -> tuple[DropPlan, SAPlan]:
        return DropPlan(layers=sorted(self.drop)), SAPlan(donors=dict(self.donors), head_map=dict(self.head_map))

    def validate(self, geo: Geometry) -> None:
        drop, sa = self.parts()
        drop.validate(geo)
        sa.validate(geo)
        both = sorted(set(self.drop) & set(self.donors))
        if both:
            raise AttnshareError(f"Layer {both[0]} is both dropped and an SA receiver in the mix plan; choose one.")
        lost = sorted(r for r, d in self.donors.items() if d in self.drop)
        if lost:
            raise AttnshareError(f"SA receiver {lost[0]} reuses layer {self.donors[lost[0]]}, which the mix plan drops; "
                                 "pick a donor that keeps its attention.")

    def first_changed_layer(self) -> int:
        return min(part.first_changed_layer() for part in self.parts())

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "drop": sorted(self.drop),
                "donors": {str(r): d for r, d in sorted(self.donors.items())},
                "head_map": {str(r): h for r, h in sorted(self.head_map.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MixPlan:
        return cls(drop=sorted(int(x) for x in data.get("drop", [])),
                   donors={r: int(d) for r, d in int_keys(data.get("donors", {})).items()},
                   head_map={r: [int(h) for h in hs] for r, hs in int_keys(data.get("head_map", {})).items()})

    def summary(self) -> str:
        pairs = ", ".join(f"{r}<-{d}" for r, d in sorted(self.donors.items()))
        parts = [f"drop {len(self.drop)} ({', '.join(map(str, sorted(self.drop)))})"] if self.drop else []
        parts += [f"sa {len(self.donors)} ({pairs}){' aligned' if self.head_map else ''}"] if self.donors else []
        return f"mix: {'; '.join(parts) or 'nothing'}"
