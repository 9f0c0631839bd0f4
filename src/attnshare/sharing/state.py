"""The sharing state kept on a shared model: what was applied, how to undo it, and the per-forward context."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..attention.context import ShareContext
from ..models.loading import load_base
from ..plan import Plan

STATE_ATTR = "attnshare_state"


@dataclass
class Applied:
    """One applied plan and how to undo it (callables run in reverse order)."""

    plan: Plan
    undo: list[Callable[[], None]] = field(default_factory=list)


@dataclass
class SharingState:
    """Plain (non-module) attribute of a shared model: what was applied, and the per-forward context."""

    identity: dict[str, Any]
    context: ShareContext = field(default_factory=ShareContext)
    applied: list[Applied] = field(default_factory=list)
    keep_originals: bool = False
    trained: set[str] = field(default_factory=set)  # parameter names changed by training: saved in artifacts
    _base_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's weights, reloaded from its source (used to undo surgery that freed weights)."""
        if self._base_state is None:
            base, _ = load_base(self.identity)
            self._base_state = base.state_dict()
        return self._base_state


def state_of(model: nn.Module) -> SharingState | None:
    return getattr(model, STATE_ATTR, None)
