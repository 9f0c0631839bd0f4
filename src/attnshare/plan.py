"""Sharing plans: plain data per method, validated against a model's geometry, with a JSON round trip.

A plan file holds one plan (``{"method": "sa", ...}``) or a list of plans applied in order (composition).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .arch import Geometry
from .errors import AttnshareError

UNCHANGED = 1 << 30  # first_changed_layer of a plan that changes nothing


@dataclass
class Plan:
    """Base class of every method's plan. Subclasses are dataclasses of JSON-friendly fields."""

    method: ClassVar[str] = ""

    def validate(self, geo: Geometry) -> None:
        """Raise AttnshareError (one sentence) if the plan does not fit a model of this geometry."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        raise NotImplementedError

    def summary(self) -> str:
        return self.method

    def first_changed_layer(self) -> int:
        """The lowest decoder layer this plan changes or reads from (0 unless a plan knows better): below it the
        shared model computes exactly what the base computes, so measurements may reuse the base's activations."""
        return 0


UNIT_SLACK = 0.01  # a savings target within 1% of a unit of a whole number of units asks for that number


def units_for(units: float) -> int:
    """Whole units (layers, half-layers of KV cache, sharing units) a savings target of ``units`` asks for: rounded
    up, except that a target within :data:`UNIT_SLACK` of a unit above a whole number is that number, so
    ``--kv-saving 0.0667`` on 30 layers (4.002 of 60 half-layers) asks for 4, as the user means 1/15."""
    return math.ceil(units - UNIT_SLACK)


def int_keys(mapping: dict) -> dict[int, Any]:
    """JSON turns int keys into strings; turn them back."""
    return {int(k): v for k, v in mapping.items()}


def check_layer(layer: int, geo: Geometry, what: str) -> None:
    if not 0 <= layer < geo.num_layers:
        raise AttnshareError(
            f"The plan names {what} layer {layer}, out of range for a {geo.num_layers}-layer model (layers "
            f"0..{geo.num_layers - 1}); make the plan for this model."
        )


def check_layer_list(layers: list[int], flag: str, what: str, why_not_zero: str) -> None:
    """Refuse negative, zero or repeated layer indices in a config's ``flag`` list (before any model is loaded)."""
    if any(layer < 0 for layer in layers):
        raise AttnshareError(f"{what} {min(layers)} is not a layer index; pick layers from 1 up.")
    if 0 in layers:
        raise AttnshareError(f"Layer 0 {why_not_zero}; leave it out of {flag}.")
    if len(set(layers)) != len(layers):
        twice = next(layer for layer in layers if layers.count(layer) > 1)
        raise AttnshareError(f"{flag} lists layer {twice} twice; list each layer once.")


def save_plans(plans: Plan | list[Plan], path: str | Path) -> None:
    plans = plans if isinstance(plans, list) else [plans]
    payload = plans[0].to_dict() if len(plans) == 1 else [p.to_dict() for p in plans]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
