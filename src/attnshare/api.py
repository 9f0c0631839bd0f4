"""Apply, undo, save and load sharing plans (the artifact: plan + extra tensors + base-model identity)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .arch import geometry
from .attention.dispatch import uninstall
from .errors import AttnshareError
from .methods import get_method
from .methods.base import STATE_ATTR, Applied, SharingState, state_of
from .models.loading import model_identity
from .plan import Plan, plans_from_json

log = logging.getLogger(__name__)

ARTIFACT_JSON = "attnshare.json"
ARTIFACT_TENSORS = "params.safetensors"
FORMAT = "attnshare-artifact"


def apply(model: nn.Module, plans: Plan | list[Plan], *, keep_originals: bool = False) -> nn.Module:
    """Apply one or more plans in order, in place. Every plan is validated before anything changes.

    Args:
        keep_originals: keep removed weights in memory so :func:`unapply` needs no reload (no memory saving).
    """
    plans = plans if isinstance(plans, list) else [plans]
    geo = geometry(model)
    for plan in plans:
        plan.validate(geo)
    state = state_of(model)
    if state is None:
        state = SharingState(identity=model_identity(model), keep_originals=keep_originals)
        setattr(model, STATE_ATTR, state)
    for plan in plans:
        applied = Applied(plan)
        get_method(plan.method).apply(model, plan, state, applied)
        state.applied.append(applied)
        log.info("applied %s", plan.summary())
    return model


def train(model: nn.Module, tokenizer, plan: Plan, config=None, *, teacher: nn.Module | None = None):
    """Apply ``plan`` and train what its method trains (LiSA modules, SA healing, PostShare), in place.

    ``config`` is a :class:`attnshare.training.TrainConfig` (default settings when None); ``teacher`` is the unshared
    model to distil from (reloaded from the base when None and the method needs one). Returns the TrainResult.
    """
    from .training import TrainConfig

    plan.validate(geometry(model))
    return get_method(plan.method).fit(model, tokenizer, plan, config or TrainConfig(), teacher)


def unapply(model: nn.Module) -> nn.Module:
    """Undo every applied plan, restoring the base modules (weights reloaded from the base if they were freed)."""
    state = state_of(model)
    if state is None:
        return model
    for applied in reversed(state.applied):
        for undo in reversed(applied.undo):
            undo()
    state.context.clear()
    uninstall(model)
    delattr(model, STATE_ATTR)
    return model


def applied_plans(model: nn.Module) -> list[Plan]:
    state = state_of(model)
    return [a.plan for a in state.applied] if state else []


def save(model: nn.Module, out_dir: str | Path) -> Path:
    """Write the artifact: ``attnshare.json`` (plans, base identity) and ``params.safetensors`` (extra tensors).

    The folder is written aside and renamed, so an interrupted save leaves nothing half-written.
    """
    from safetensors.torch import save_file

    state = state_of(model)
    if state is None or not state.applied:
        raise AttnshareError("This model has no sharing applied; apply a plan before saving an artifact.")
    tensors: dict[str, torch.Tensor] = {}
    for applied in state.applied:
        tensors.update(get_method(applied.plan.method).artifact_tensors(model, applied.plan))
    params = dict(model.named_parameters())
    tensors.update({name: params[name] for name in sorted(state.trained) if name in params})
    meta = {
        "format": FORMAT,
        "format_version": 1,
        "attnshare_version": __version__,
        "base": state.identity,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "plans": [a.plan.to_dict() for a in state.applied],
        "tensors": sorted(tensors),
    }
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        (tmp / ARTIFACT_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        if tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / ARTIFACT_TENSORS)
        (tmp / "README.md").write_text(_card(meta))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / ARTIFACT_JSON).is_file()


def read_artifact(path: str | Path) -> dict:
    path = Path(path)
    meta_path = path / ARTIFACT_JSON
    if not meta_path.is_file():
        raise AttnshareError(f"'{path}' is not an attnshare artifact (no {ARTIFACT_JSON}); save one with `attnshare apply --out`.")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AttnshareError(f"The artifact file '{meta_path}' is corrupt ({e.__class__.__name__}); save the artifact again.") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "plans" not in meta or "base" not in meta:
        raise AttnshareError(f"The artifact file '{meta_path}' is not in attnshare's format; save the artifact again.")
    return meta


def load(path: str | Path, model: nn.Module | None = None, *, dtype=None, device="cpu"):
    """Rebuild a shared model from an artifact: ``(model, tokenizer)``.

    With ``model`` given, the plans are applied onto it (refused if it is not the artifact's base model) and the
    tokenizer returned is None.
    """
    from .models import load_model

    path = Path(path)
    meta = read_artifact(path)
    plans = plans_from_json(meta["plans"])
    tensors = _read_tensors(path, meta)
    tokenizer = None
    if model is None:
        base = meta["base"]
        model, tokenizer = load_model(
            base["base_model"], dtype=dtype or meta.get("dtype", "float32"), num_layers=base.get("num_layers"),
            device=device,
        )
    identity = model_identity(model)
    if identity["fingerprint"] != meta["base"]["fingerprint"]:
        raise AttnshareError(
            f"The artifact '{path}' was made for base model '{meta['base']['base_model']}', not for this model; "
            "load it onto its own base model."
        )
    apply(model, plans)
    state_of(model).trained.update(k for k in tensors if k in dict(model.named_parameters()))
    if tensors:
        named = dict(model.named_parameters()) | dict(model.named_buffers())
        missing = [k for k in tensors if k not in named]
        if missing:
            raise AttnshareError(f"The artifact '{path}' holds tensors this model lacks ({missing[0]}...); save it again.")
        with torch.no_grad():
            for key, value in tensors.items():
                named[key].copy_(value)
    return model, tokenizer


def _read_tensors(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    expected = meta.get("tensors", [])
    if not expected:
        return {}
    file = path / ARTIFACT_TENSORS
    try:
        tensors = load_file(file)
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise AttnshareError(f"The artifact tensor file '{file}' is missing or corrupt; save the artifact again.") from e
    if sorted(tensors) != sorted(expected):
        raise AttnshareError(f"The artifact tensor file '{file}' does not match {ARTIFACT_JSON}; save the artifact again.")
    return tensors


def _card(meta: dict) -> str:
    plans = "\n".join(f"- `{p['method']}`" for p in meta["plans"])
    return (
        f"# attnshare artifact\n\nBase model: `{meta['base']['base_model']}` (fingerprint `{meta['base']['fingerprint']}`)\n\n"
        f"Plans, applied in order:\n{plans}\n\nLoad with `attnshare.load(path)` or `attnshare eval --model PATH`.\n"
    )
