"""The public API in one place: load (a base model or an artifact), apply, train, undo, save.

The work is done below: :mod:`attnshare.sharing` applies and undoes plans, :mod:`attnshare.artifact` writes and
reads artifacts, :mod:`attnshare.models` loads base models, each method trains in its own folder.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoTokenizer

from .arch import geometry
from .artifact import is_artifact, load, read_artifact, save
from .models.loading import load_model as load_base_model
from .models.loading import resolve
from .plan import Plan
from .sharing.apply import applied_plans, apply, unapply
from .sharing.registry import get_method
from .sharing.state import state_of
from .training import TrainConfig

__all__ = ["applied_plans", "apply", "is_artifact", "load", "load_model", "read_artifact", "save", "train", "unapply"]


def load_model(name_or_path: str = "smollm2-135m", *, dtype: torch.dtype | str = torch.float32,
               num_layers: int | None = None, attn_implementation: str = "sdpa", device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from an embedded name, a local folder, a cached HF id, or an attnshare artifact (its
    base model with the plans re-applied and the saved tensors loaded)."""
    if is_artifact(name_or_path):
        model, _ = load(name_or_path, dtype=dtype, device=device)
        base = state_of(model).identity["base_model"]  # the artifact's base, as recorded when its plans were applied
        return model, AutoTokenizer.from_pretrained(resolve(base), local_files_only=True)
    return load_base_model(name_or_path, dtype=dtype, num_layers=num_layers,
                           attn_implementation=attn_implementation, device=device)


def train(model: nn.Module, tokenizer, plan: Plan, config: TrainConfig | None = None, *,
          teacher: nn.Module | None = None):
    """Apply ``plan`` and train what its method trains (LiSA modules, SA healing, PostShare), in place.

    ``config`` is a :class:`attnshare.training.TrainConfig` (default settings when None); ``teacher`` is the unshared
    model to distil from (reloaded from the base when None and the method needs one). Returns the TrainResult.
    """
    plan.validate(geometry(model))
    return get_method(plan.method).fit(model, tokenizer, plan, config or TrainConfig(), teacher)
