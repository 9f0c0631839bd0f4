"""The PostShare plan: DirectShare's pairs plus how the post-training that precedes sharing runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...arch import Geometry
from ..directshare.plan import DirectSharePlan
from .config import check_training


@dataclass
class PostSharePlan(DirectSharePlan):
    method = "postshare"

    reg_weight: float = 100.0
    train_scope: str = "attention"
    data_term: str = "distill"

    def validate(self, geo: Geometry) -> None:
        super().validate(geo)
        check_training(self.reg_weight, self.train_scope, self.data_term)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "reg_weight": self.reg_weight, "train_scope": self.train_scope,
                "data_term": self.data_term}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PostSharePlan:
        base = DirectSharePlan.from_dict(data)
        return cls(pairs=base.pairs, match=base.match, share_o=base.share_o, ratio=base.ratio,
                   reg_weight=float(data.get("reg_weight", 100.0)), train_scope=str(data.get("train_scope", "attention")),
                   data_term=str(data.get("data_term", "distill")))

    def summary(self) -> str:
        return f"{super().summary()}; trained {self.train_scope} ({self.data_term}, lambda {self.reg_weight:g})"
