"""The PostShare plan: DirectShare's pairs plus how the post-training that precedes sharing runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...analysis.collect import check_calibration_text
from ...arch import Geometry
from ..directshare.plan import DirectSharePlan
from .config import check_training


@dataclass
class PostSharePlan(DirectSharePlan):
    method = "postshare"

    reg_weight: float = 100.0
    train_scope: str = "tied"
    data_term: str = "distill"
    guard_tokens: int = 256  # held-out calibration tokens of the keep-the-better check (0: no check)
    calib_text: str = "plays"  # the text the check reads (never an evaluation text)

    def validate(self, geo: Geometry) -> None:
        super().validate(geo)
        check_training(self.reg_weight, self.train_scope, self.data_term, self.guard_tokens)
        check_calibration_text(self.calib_text)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "reg_weight": self.reg_weight, "train_scope": self.train_scope,
                "data_term": self.data_term, "guard_tokens": self.guard_tokens, "calib_text": self.calib_text}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PostSharePlan:
        base = DirectSharePlan.from_dict(data)
        return cls(**base.base_fields(),
                   reg_weight=float(data.get("reg_weight", 100.0)), train_scope=str(data.get("train_scope", "tied")),
                   data_term=str(data.get("data_term", "distill")), guard_tokens=int(data.get("guard_tokens", 0)),
                   calib_text=str(data.get("calib_text", "plays")))

    def summary(self) -> str:
        guard = f", kept only if it beats DirectShare on {self.guard_tokens} held-out tokens" if self.guard_tokens else ""
        pull = "" if self.train_scope == "tied" else f", lambda {self.reg_weight:g}"
        return f"{super().summary()}; trained {self.train_scope} ({self.data_term}{pull}{guard})"
