"""The interface every sharing method implements (the state it keeps on a model: :mod:`attnshare.sharing.state`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from ..plan import Plan
from ..sharing.apply import apply
from ..sharing.state import Applied, SharingState
from ..training import train_shared


class SharingMethod(ABC):
    """A sharing method: a config (planning knobs), a plan type, and how to apply a plan to a model."""

    name: ClassVar[str]
    baseline: ClassVar[bool] = False  # a simple alternative to sharing (removal), shown beside every method
    config_cls: ClassVar[type]
    distill_target: ClassVar[str] = "logits"  # what `--distill-target auto` matches when training this method
    plan_cls: ClassVar[type[Plan]]

    @abstractmethod
    def make_plan(self, model: nn.Module, config: Any) -> Plan:
        """Choose what to share on ``model`` under ``config`` (may run an analysis)."""

    def make_plans(self, model: nn.Module, configs: list[Any]) -> list[Plan]:
        """Plans for several configs (a budget sweep); methods whose planner can share work override this."""
        return [self.make_plan(model, config) for config in configs]

    def config_for_saving(self, model: nn.Module, kind: str, fraction: float) -> Any | None:
        """A config whose plan saves about ``fraction`` (at least, where steps are coarse) of ``model``'s KV cache
        (``kind="kv"``) or parameters (``kind="params"``), or None where this method cannot reach it untrained.
        Used for equal-savings comparisons (``attnshare compare``)."""
        return None

    @abstractmethod
    def apply(self, model: nn.Module, plan: Plan, state: SharingState, applied: Applied) -> None:
        """Change ``model`` in place; append undo callables to ``applied.undo``."""

    def settle(self, model: nn.Module, plan: Plan, state: SharingState) -> None:
        """Called for an applied ``plan`` after a later plan changed ``model``: free what this plan stored for
        modules that are gone (DirectShare's bank rows only SA receivers' removed q/k read). Default: nothing."""

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
        apply(model, plan)
        return train_shared(model, tokenizer, config, teacher=teacher)
