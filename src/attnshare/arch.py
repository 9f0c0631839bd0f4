"""Per-architecture facts, one record per ``model_type``: where things live and how heads are laid out.

Everything that depends on a model family's layout goes through :func:`arch_of`; no other module names
``model.model.layers`` or ``q_proj`` directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import AttnshareError


@dataclass(frozen=True)
class ArchSpec:
    """Where a family keeps its decoder layers and attention projections."""

    model_type: str
    layers: str = "model.layers"  # dotted path from the CausalLM to the ModuleList of decoder layers
    attn: str = "self_attn"  # attribute of a decoder layer holding the attention module
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3, Gemma3)


ARCHS: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama"),
        ArchSpec("mistral"),
        ArchSpec("qwen2"),
        ArchSpec("qwen3", qk_norm=True),
        ArchSpec("gemma3_text", qk_norm=True),
    )
}
ALIASES = {"gemma3": "gemma3_text"}  # the multimodal Gemma3 config wraps a gemma3_text decoder


@dataclass(frozen=True)
class Geometry:
    """Head layout of a model: L layers, H query heads, Hkv key/value heads, d head dim, D hidden size."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    layer_types: tuple[str, ...]  # "full_attention" or "sliding_attention" per layer

    @property
    def group_size(self) -> int:
        """G = H / Hkv query heads per key/value head."""
        return self.num_heads // self.num_kv_heads


def supported_types() -> str:
    return ", ".join(sorted(ARCHS))


def arch_of(model_or_config) -> ArchSpec:
    """The ArchSpec of a model or config, or a clear error listing the supported types."""
    config = getattr(model_or_config, "config", model_or_config)
    config = getattr(config, "text_config", None) or config
    model_type = ALIASES.get(config.model_type, config.model_type)
    if model_type not in ARCHS:
        raise AttnshareError(
            f"Model type '{config.model_type}' is not supported; supported types are: {supported_types()}."
        )
    return ARCHS[model_type]


def geometry(model_or_config) -> Geometry:
    """Head counts and layer kinds read from a model's config."""
    config = getattr(model_or_config, "config", model_or_config)
    config = getattr(config, "text_config", None) or config
    arch_of(config)
    num_layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * num_layers
    return Geometry(
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
        layer_types=tuple(layer_types),
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers of a causal LM."""
    module = model
    for part in arch_of(model).layers.split("."):
        module = getattr(module, part)
    return module


def attention(model: nn.Module, layer: int) -> nn.Module:
    """The attention module of decoder layer ``layer`` (a removed block has none)."""
    module = getattr(decoder_layers(model)[layer], arch_of(model).attn, None)
    if module is None:
        raise AttnshareError(f"Layer {layer} has no attention module (its decoder block was removed by layerdrop).")
    return module


def set_attention(model: nn.Module, layer: int, module: nn.Module) -> None:
    """Replace the attention module of decoder layer ``layer``."""
    setattr(decoder_layers(model)[layer], arch_of(model).attn, module)


def qk_parameters(model: nn.Module, layer: int) -> int:
    """Parameters of layer ``layer``'s query and key projections (and q/k norms): what an SA receiver frees."""
    spec, module = arch_of(model), attention(model, layer)
    names = (spec.q, spec.k) + (("q_norm", "k_norm") if spec.qk_norm else ())
    return sum(p.numel() for name in names if hasattr(module, name) for p in getattr(module, name).parameters())


def attention_parameters(model: nn.Module, layer: int) -> int:
    """Parameters of layer ``layer``'s whole attention module: what dropping it frees."""
    return sum(p.numel() for p in attention(model, layer).parameters())
