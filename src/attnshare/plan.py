"""Sharing plans: plain data per method, validated against a model's geometry, with a JSON round trip.

A plan file holds one plan (``{"method": "sa", ...}``) or a list of plans applied in order (composition).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .arch import Geometry
from .errors import AttnshareError


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


def int_keys(mapping: dict) -> dict[int, Any]:
    """JSON turns int keys into strings; turn them back."""
    return {int(k): v for k, v in mapping.items()}


def check_layer(layer: int, geo: Geometry, what: str) -> None:
    if not 0 <= layer < geo.num_layers:
        raise AttnshareError(
            f"The plan names {what} layer {layer}, but the model has layers 0..{geo.num_layers - 1}; "
            "make the plan for this model."
        )


def plan_from_dict(data: dict[str, Any]) -> Plan:
    from .methods import get_method

    if not isinstance(data, dict) or "method" not in data:
        raise AttnshareError("A plan must be a JSON object with a 'method' field; write it with `attnshare plan`.")
    try:
        return get_method(data["method"]).plan_cls.from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, AttnshareError):
            raise
        raise AttnshareError(f"The {data['method']} plan is malformed ({e}); write it with `attnshare plan`.") from e


def plans_from_json(obj: Any) -> list[Plan]:
    """One plan object or a list of them."""
    return [plan_from_dict(d) for d in (obj if isinstance(obj, list) else [obj])]


def load_plans(path: str | Path) -> list[Plan]:
    path = Path(path)
    if not path.is_file():
        raise AttnshareError(f"The plan file '{path}' does not exist; write one with `attnshare plan`.")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AttnshareError(f"The plan file '{path}' is not valid JSON ({e.__class__.__name__}); write it again.") from e
    return plans_from_json(obj)


def save_plans(plans: Plan | list[Plan], path: str | Path) -> None:
    plans = plans if isinstance(plans, list) else [plans]
    payload = plans[0].to_dict() if len(plans) == 1 else [p.to_dict() for p in plans]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
