"""The layerdrop plan: the decoder blocks that are removed."""

from __future__ import annotations

from dataclasses import dataclass

from ..drop.plan import DropPlan


@dataclass
class LayerDropPlan(DropPlan):
    method = "layerdrop"

    def summary(self) -> str:
        return f"layerdrop: {len(self.layers)} blocks ({', '.join(map(str, sorted(self.layers)))})"
