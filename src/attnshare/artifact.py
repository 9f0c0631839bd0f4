"""The artifact: a small folder that rebuilds a shared model on its base model.

``attnshare.json`` holds the plans (applied in order), the base model's identity and the names of the extra
tensors; ``params.safetensors`` holds those tensors (new modules, trained weights). Only JSON and safetensors are
read: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import AttnshareError
from .models.loading import load_base, model_identity
from .paths import read_json, write_folder
from .sharing.apply import apply
from .sharing.registry import get_method, plans_from_json
from .sharing.state import state_of
from .version import __version__

ARTIFACT_JSON = "attnshare.json"
ARTIFACT_TENSORS = "params.safetensors"
FORMAT = "attnshare-artifact"


def save(model: nn.Module, out_dir: str | Path) -> Path:
    """Write the artifact: ``attnshare.json`` (plans, base identity) and ``params.safetensors`` (extra tensors).

    The folder is written aside and renamed, so an interrupted save leaves nothing half-written.
    """
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

    def write(tmp: Path) -> None:
        (tmp / ARTIFACT_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        if tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / ARTIFACT_TENSORS)
        (tmp / "README.md").write_text(_card(meta))

    return write_folder(Path(out_dir), write)


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / ARTIFACT_JSON).is_file()


def read_artifact(path: str | Path) -> dict:
    path = Path(path)
    meta_path = path / ARTIFACT_JSON
    meta = read_json(
        meta_path, f"'{path}' is not an attnshare artifact (no {ARTIFACT_JSON}); save one with `attnshare apply --out`.",
        f"The artifact file '{meta_path}' is corrupt ({{error}}); save the artifact again.")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "plans" not in meta or "base" not in meta:
        raise AttnshareError(f"The artifact file '{meta_path}' is not in attnshare's format; save the artifact again.")
    return meta


def load(path: str | Path, model: nn.Module | None = None, *, dtype=None, device="cpu"):
    """Rebuild a shared model from an artifact: ``(model, tokenizer)``.

    With ``model`` given, the plans are applied onto it (refused if it is not the artifact's base model) and the
    tokenizer returned is None.
    """
    path = Path(path)
    meta = read_artifact(path)
    plans = plans_from_json(meta["plans"])
    tensors = _read_tensors(path, meta)
    tokenizer = None
    if model is None:
        model, tokenizer = load_base(meta["base"], dtype=dtype or meta.get("dtype", "float32"), device=device)
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
