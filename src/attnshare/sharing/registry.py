"""Registry of sharing methods: name -> "module:Class", imported only when used; plans read back by method."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ..errors import AttnshareError
from ..paths import read_json
from ..plan import Plan

METHODS: dict[str, str] = {
    "sa": "attnshare.methods.sa:SA",
    "lisa": "attnshare.methods.lisa:LiSA",
    "directshare": "attnshare.methods.directshare:DirectShare",
    "postshare": "attnshare.methods.postshare:PostShare",
    "drop": "attnshare.methods.drop:Drop",  # baseline: attention sublayers removed
    "layerdrop": "attnshare.methods.layerdrop:LayerDrop",  # baseline: whole decoder blocks removed
    "mix": "attnshare.methods.mix:Mix",  # per layer: keep, SA receiver or drop
}


def register_method(name: str, target: str) -> None:
    """Register a method by import path ("package.module:Class"), e.g. from a plug-in."""
    METHODS[name] = target


def get_method(name: str):
    """The :class:`attnshare.methods.base.SharingMethod` registered as ``name``."""
    if name not in METHODS:
        raise AttnshareError(f"Unknown method '{name}'; choose one of: {', '.join(sorted(METHODS))}.")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def method_names() -> list[str]:
    return sorted(METHODS)


def plan_from_dict(data: dict[str, Any]) -> Plan:
    """A plan from its JSON object, typed by its method's plan class."""
    if not isinstance(data, dict) or "method" not in data:
        raise AttnshareError("A plan must be a JSON object with a 'method' field; write it with `attnshare plan`.")
    try:
        return get_method(data["method"]).plan_cls.from_dict(data)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, AttnshareError):
            raise
        raise AttnshareError(f"The {data['method']} plan is malformed ({e}); write it with `attnshare plan`.") from e


def plans_from_json(obj: Any) -> list[Plan]:
    """One plan object or a list of them."""
    return [plan_from_dict(d) for d in (obj if isinstance(obj, list) else [obj])]


def load_plans(path: str | Path) -> list[Plan]:
    return plans_from_json(read_json(
        Path(path), f"The plan file '{path}' does not exist; write one with `attnshare plan`.",
        f"The plan file '{path}' is not valid JSON ({{error}}); write it again."))
