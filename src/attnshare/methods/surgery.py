"""Module surgery shared by the methods: detach submodules for real (memory freed), put them back on undo."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Detached:
    """A submodule taken out of ``owner``. Unless kept, its tensors moved to the meta device (memory freed)."""

    owner: nn.Module
    name: str
    module: nn.Module
    path: str  # state-dict prefix of the module inside the model, e.g. "model.layers.5.self_attn.k_proj"
    kept: bool
    device: torch.device


def detach(owner: nn.Module, owner_path: str, names: list[str], keep: bool) -> list[Detached]:
    out = []
    for name in names:
        module = getattr(owner, name, None)
        if module is None:
            continue
        device = next(module.parameters(), torch.empty(0)).device
        delattr(owner, name)
        out.append(Detached(owner, name, module if keep else module.to("meta"), f"{owner_path}.{name}", keep, device))
    return out


def reattach(detached: list[Detached], base_state: Callable[[], dict[str, torch.Tensor]]) -> None:
    """Put detached modules back; modules whose weights were freed are refilled from the base checkpoint."""
    for d in detached:
        if not d.kept:
            state = base_state()
            d.module.to_empty(device=d.device)
            with torch.no_grad():
                for key, tensor in d.module.state_dict(keep_vars=True).items():
                    tensor.copy_(state[f"{d.path}.{key}"])
        setattr(d.owner, d.name, d.module)


def num_params(modules: list[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())
