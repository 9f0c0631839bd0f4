"""Registry of sharing methods: name -> "module:Class", imported only when used."""

from __future__ import annotations

import importlib

from ..errors import AttnshareError
from .base import SharingMethod

METHODS: dict[str, str] = {
    "sa": "attnshare.methods.sa:SA",
    "lisa": "attnshare.methods.lisa:LiSA",
    "directshare": "attnshare.methods.directshare:DirectShare",
    "postshare": "attnshare.methods.postshare:PostShare",
}


def register_method(name: str, target: str) -> None:
    """Register a method by import path ("package.module:Class"), e.g. from a plug-in."""
    METHODS[name] = target


def get_method(name: str) -> SharingMethod:
    if name not in METHODS:
        raise AttnshareError(f"Unknown method '{name}'; choose one of: {', '.join(sorted(METHODS))}.")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def method_names() -> list[str]:
    return sorted(METHODS)
