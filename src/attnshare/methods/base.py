"""The interface every sharing method implements, and the sharing state kept on a model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..attention.context import ShareContext
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
            from ..models import load_model

            base, _ = load_model(self.identity["base_model"], num_layers=self.identity["num_layers"])
            self._base_state = base.state_dict()
        return self._base_state


def state_of(model: nn.Module) -> SharingState | None:
    return getattr(model, STATE_ATTR, None)


class SharingMethod(ABC):
    """A sharing method: a config (planning knobs), a plan type, and how to apply a plan to a model."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    plan_cls: ClassVar[type[Plan]]

    @abstractmethod
    def make_plan(self, model: nn.Module, config: Any) -> Plan:
        """Choose what to share on ``model`` under ``config`` (may run an analysis)."""

    def make_plans(self, model: nn.Module, configs: list[Any]) -> list[Plan]:
        """Plans for several configs (a budget sweep); methods whose planner can share work override this."""
        return [self.make_plan(model, config) for config in configs]

    @abstractmethod
    def apply(self, model: nn.Module, plan: Plan, state: SharingState, applied: Applied) -> None:
        """Change ``model`` in place; append undo callables to ``applied.undo``."""

    def artifact_tensors(self, model: nn.Module, plan: Plan) -> dict[str, torch.Tensor]:
        """Tensors (by state-dict name) an artifact must store beyond the base model; default none."""
        return {}

    def trainable_parameters(self, model: nn.Module, plan: Plan) -> list[tuple[str, nn.Parameter]]:
        """Parameters a training stage updates for this method; default none."""
        return []

    def fit(self, model: nn.Module, tokenizer, plan: Plan, config, teacher=None):
        """Apply ``plan`` to ``model`` and train it (``config`` is a :class:`attnshare.training.TrainConfig`).

        Default: apply, then distil the unshared model into the parameters :meth:`trainable_parameters` declares.
        Methods override this when training comes first (PostShare) or in stages (LiSA's layer-local fit).
        Returns the :class:`attnshare.training.TrainResult` of the (last) training stage.
        """
        from ..api import apply
        from ..training import train_shared

        apply(model, plan)
        return train_shared(model, tokenizer, config, teacher=teacher)
