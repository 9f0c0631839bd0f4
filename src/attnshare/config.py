"""Typed config dataclasses generate their own CLI flags: fields and ``metadata["help"]`` are written once."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def _base_type(tp: Any) -> Any:
    """``int | None`` -> int; other types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "", tag: str = "") -> None:
    """Add one ``--flag`` per dataclass field (kebab-case), with the field's help text and default.

    With ``tag`` (e.g. a method name) the help reads ``tag: text (default: ...)``, and a flag that several configs
    share (e.g. ``--kv-saving``) lists every config's meaning, each after its tag.
    """
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        meaning = f"{f.metadata.get('help', '')} (default: {default})"
        if flag in parser._option_string_actions:  # several configs may share a field (e.g. seed): one flag
            action = parser._option_string_actions[flag]
            parts = getattr(action, "tagged_help", None)
            if tag and parts is not None:
                parts.setdefault(meaning, []).append(tag)
                action.help = tagged_help(parts)
            continue
        tp = _base_type(hints[f.name])
        kwargs: dict[str, Any] = {"dest": prefix.replace("-", "_") + f.name, "default": argparse.SUPPRESS}
        help_text = f.metadata.get("help", "")
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, tuple):
            kwargs.update(nargs="+", type=typing.get_args(tp)[0] if typing.get_args(tp) else str)
        else:
            kwargs["type"] = tp
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        kwargs["help"] = tagged_help({meaning: [tag]}) if tag else f"{help_text} (default: {default})"
        aliases = ["--" + prefix + a for a in f.metadata.get("aliases", ())]
        action = group.add_argument(flag, *[a for a in aliases if a not in parser._option_string_actions], **kwargs)
        if tag:
            action.tagged_help = {meaning: [tag]}  # meaning -> configs that give the flag this meaning


def tagged_help(parts: dict[str, list[str]]) -> str:
    """``tag1, tag2: meaning; tag3: other meaning``."""
    return "; ".join(f"{', '.join(tags)}: {meaning}" for meaning, tags in parts.items())


def dataclass_from_args(cls: type, args: argparse.Namespace, prefix: str = "", **overrides: Any):
    """Build ``cls`` from the flags that were given (defaults come from the dataclass itself)."""
    values = {}
    for f in dataclasses.fields(cls):
        key = prefix.replace("-", "_") + f.name
        if hasattr(args, key):
            values[f.name] = getattr(args, key)
    values.update(overrides)
    return cls(**values)
