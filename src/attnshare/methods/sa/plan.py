"""The SA plan: receiver -> donor layer, and an optional receiver-head -> donor-head map."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...arch import Geometry
from ...errors import AttnshareError
from ...plan import UNCHANGED, Plan, check_layer, int_keys


@dataclass
class SAPlan(Plan):
    method = "sa"

    donors: dict[int, int] = field(default_factory=dict)  # receiver layer -> donor layer
    head_map: dict[int, list[int]] = field(default_factory=dict)  # receiver -> donor head used by each head
    fused_prefill: bool = True

    def validate(self, geo: Geometry) -> None:
        for receiver, donor in sorted(self.donors.items()):
            check_layer(receiver, geo, "receiver")
            check_layer(donor, geo, "donor")
            if donor >= receiver:
                raise AttnshareError(
                    f"Layer {receiver} cannot reuse layer {donor}: a donor must come before its receiver."
                )
            if donor in self.donors:
                raise AttnshareError(
                    f"Layer {donor} is a receiver, so it cannot be the donor of layer {receiver}; pick a layer that "
                    "computes its own attention."
                )
            if geo.layer_types[donor] != geo.layer_types[receiver]:
                raise AttnshareError(
                    f"Layer {receiver} ({geo.layer_types[receiver]}) cannot reuse layer {donor} "
                    f"({geo.layer_types[donor]}): donor and receiver must have the same window kind."
                )
        for receiver, heads in self.head_map.items():
            if receiver not in self.donors:
                raise AttnshareError(f"The head map names layer {receiver}, which is not a receiver in this plan.")
            if len(heads) != geo.num_heads or not all(0 <= h < geo.num_heads for h in heads):
                raise AttnshareError(
                    f"The head map of layer {receiver} must list {geo.num_heads} donor heads in 0..{geo.num_heads - 1}."
                )

    def first_changed_layer(self) -> int:
        return min(self.donors.values(), default=UNCHANGED)

    @property
    def receivers(self) -> list[int]:
        return sorted(self.donors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "donors": {str(r): d for r, d in sorted(self.donors.items())},
            "head_map": {str(r): h for r, h in sorted(self.head_map.items())},
            "fused_prefill": self.fused_prefill,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAPlan:
        return cls(
            donors={r: int(d) for r, d in int_keys(data.get("donors", {})).items()},
            head_map={r: [int(h) for h in hs] for r, hs in int_keys(data.get("head_map", {})).items()},
            fused_prefill=bool(data.get("fused_prefill", True)),
        )

    def summary(self) -> str:
        pairs = ", ".join(f"{r}<-{d}" for r, d in sorted(self.donors.items()))
        return f"sa: {len(self.donors)} receivers ({pairs}){' aligned' if self.head_map else ''}"


def nearest_donors(receivers: list[int], geo: Geometry, unavailable: frozenset[int] = frozenset()) -> dict[int, int]:
    """Each receiver reuses the nearest earlier non-receiver layer of the same window kind (never one of
    ``unavailable``: layers that compute no attention, e.g. dropped ones)."""
    chosen = set(receivers) | set(unavailable)
    for r in sorted(receivers):
        if not 0 <= r < geo.num_layers:
            raise AttnshareError(
                f"Receiver layer {r} is out of range for a {geo.num_layers}-layer model; pick receivers in "
                f"1..{geo.num_layers - 1}."
            )
    donors = {}
    for r in sorted(receivers):
        candidates = [d for d in range(r - 1, -1, -1) if d not in chosen and geo.layer_types[d] == geo.layer_types[r]]
        if not candidates:
            raise AttnshareError(f"Layer {r} has no earlier non-receiver layer of its kind to reuse; drop it from the receivers.")
        donors[r] = candidates[0]
    return donors
