"""Per-architecture facts: where a causal LM keeps its decoder layers and attention projections, how its heads
are laid out, and what its attention does that the methods must know about.

The facts are *found* from the model's modules (:func:`derive`), not listed: the ModuleList of decoder layers,
the attention submodule of each layer, its q/k/v/o Linear projections (by name, checked against the config's head
sizes), a fused q/k/v projection, and q/k norms (per head, width d, or over the whole projection, width H·d).
A layout that cannot be found is refused in one sentence naming what is missing. ``RECORDS`` holds what derivation
finds on the families the test suite covers (tests check that they agree); they answer calls that pass a bare
config, which has no modules to derive from. ``CONFIG_LIMITS`` lists config settings that change what an
attention computes beyond its projections; a family with one is limited to the methods that never recompute its
attention (see :func:`require`).

Everything that depends on a model family's layout goes through this module; no other module names
``model.model.layers`` or ``q_proj`` directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .errors import AttnshareError

# Capabilities a method may need beyond the decoder layers and the attention module (see :func:`require).
PROJECTIONS = "projections"  # q, k and v are separate Linear modules (weight sharing reads and replaces them)
REPLACE_ATTENTION = "replace_attention"  # a module may take the attention's place, computing V as v_proj(x) and
#                                          the output as o_proj(P V) (SA receivers, LiSA layers)
REMOVAL_ADVICE = "use drop or layerdrop, which remove whole sublayers instead"


@dataclass(frozen=True)
class ArchSpec:
    """Where a family keeps its decoder layers and attention projections (names relative to their parents)."""

    model_type: str
    layers: str = "model.layers"  # dotted path from the CausalLM to the ModuleList of decoder layers
    attn: str = "self_attn"  # attribute of a decoder layer holding the attention module
    qkv: tuple[str, str, str] | None = ("q_proj", "k_proj", "v_proj")  # None: fused into ``fused``
    o: str = "o_proj"
    fused: str | None = None  # one Linear computing q, k and v together (Phi-3's qkv_proj)
    qk_norm: bool = False  # RMSNorms ``q_norm``/``k_norm`` on q and k before RoPE, removed along with q and k
    qk_norm_scope: str | None = None  # "head": width d, shared by a layer's heads (Qwen3, Gemma3);
    #                                   "projection": over the whole q (H·d) and k (Hkv·d) projection (OLMo-2)
    limits: tuple[tuple[str, str], ...] = ()  # (capability, why this family lacks it: a clause)

    def limit(self, capability: str) -> str | None:
        """Why this family lacks ``capability`` (a clause), or None where it has it."""
        return next((why for cap, why in self.limits if cap == capability), None)

    def _projection(self, index: int) -> str:
        if self.qkv is None:
            raise AttnshareError(
                f"This {self.model_type} model has no separate q, k and v projections: {self.limit(PROJECTIONS)}; "
                f"{REMOVAL_ADVICE}."
            )
        return self.qkv[index]

    @property
    def q(self) -> str:
        return self._projection(0)

    @property
    def k(self) -> str:
        return self._projection(1)

    @property
    def v(self) -> str:
        return self._projection(2)


def fused_limits(name: str) -> tuple[tuple[str, str], ...]:
    why = f"its attention computes q, k and v with one Linear '{name}', which attnshare does not split"
    return ((PROJECTIONS, why), (REPLACE_ATTENTION, why))


RECORDS: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama"),
        ArchSpec("mistral"),
        ArchSpec("qwen2"),
        ArchSpec("qwen3", qk_norm=True, qk_norm_scope="head"),
        ArchSpec("gemma3_text", qk_norm=True, qk_norm_scope="head"),
        ArchSpec("gemma2"),
        ArchSpec("olmo2", qk_norm=True, qk_norm_scope="projection"),
        ArchSpec("phi3", qkv=None, fused="qkv_proj", limits=fused_limits("qkv_proj")),
    )
}
ALIASES = {"gemma3": "gemma3_text"}  # the multimodal Gemma3 config wraps a gemma3_text decoder

# Config settings that change what the attention computes beyond q/k/v/o and the mask: a replacement module
# (SA receiver, LiSA layer) that computes V as v_proj(x) would silently skip them.
CONFIG_LIMITS: dict[str, Callable[[object], str]] = {
    "clip_qkv": lambda value: f"its attention clamps q, k and v to +-{value} (clip_qkv), which a replacement "
                              "attention computing V from v_proj alone would skip",
}


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
    return ", ".join(sorted(RECORDS))


def eager_only(model_or_config) -> str | None:
    """Why this model's attention needs transformers' eager path (SDPA would skip part of it), or None."""
    cap = getattr(text_config(model_or_config), "attn_logit_softcapping", None)
    return f"its attention soft-caps logits at {cap} (attn_logit_softcapping), which SDPA skips" if cap else None


def text_config(model_or_config):
    """The decoder's config of a model or config (a multimodal config's ``text_config``)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "text_config", None) or config


def config_geometry(config) -> Geometry:
    """Head counts and layer kinds read off a decoder config."""
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


# ------------------------------------------------------------------------------------------- derivation

SPEC_ATTR = "attnshare_arch"  # attribute of a model holding its derived ArchSpec (found once, before any change)

# Names of each projection role, most common first; shapes are checked against the config, names pick the role
# (under MHA with H·d = D, q, k, v and o all have the same shape).
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj", "query", "query_proj", "wq", "q"),
    "k": ("k_proj", "key", "key_proj", "wk", "k"),
    "v": ("v_proj", "value", "value_proj", "wv", "v"),
    "o": ("o_proj", "out_proj", "dense", "wo", "o"),
}
NORM_NAMES = ("q_norm", "k_norm")  # the names the methods remove along with q and k


class LayoutError(Exception):
    """Derivation found no usable layout; the message is a clause naming what is missing or unexpected."""


class NotAttention(LayoutError):
    """A module has none of the projections an attention module has (an MLP, a norm)."""


@dataclass(frozen=True)
class AttentionLayout:
    attn: str
    qkv: tuple[str, str, str] | None
    o: str
    fused: str | None
    qk_norm_scope: str | None


def _linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {name: child for name, child in module.named_children() if isinstance(child, nn.Linear)}


def _role(linears: dict[str, nn.Linear], role: str) -> str | None:
    return next((name for name in ROLE_NAMES[role] if name in linears), None)


def _check_shape(owner: str, name: str, linear: nn.Linear, shape: tuple[int, int]) -> None:
    if (linear.in_features, linear.out_features) != shape:
        raise LayoutError(
            f"'{owner}.{name}' maps {linear.in_features} -> {linear.out_features} features where the config's head "
            f"sizes give {shape[0]} -> {shape[1]}"
        )


def _norm_scope(attn: nn.Module, path: str, geo: Geometry) -> str | None:
    """'head', 'projection' or None, from the widths of ``q_norm``/``k_norm``."""
    present = [name for name in NORM_NAMES if getattr(attn, name, None) is not None]
    if not present:
        return None
    if len(present) == 1:
        raise LayoutError(f"'{path}' has a {present[0]} but no {({*NORM_NAMES} - {*present}).pop()}")
    widths = tuple(sum(p.numel() for p in getattr(attn, name).parameters()) for name in NORM_NAMES)
    d = geo.head_dim
    if widths == (d, d):
        return "head"
    if widths == (geo.num_heads * d, geo.num_kv_heads * d):
        return "projection"
    raise LayoutError(
        f"'{path}' has q/k norms of {widths[0]} and {widths[1]} weights, neither per head ({d} each) nor over the "
        f"projections ({geo.num_heads * d} and {geo.num_kv_heads * d})"
    )


def _attention_layout(name: str, attn: nn.Module, path: str, geo: Geometry) -> AttentionLayout:
    """The layout of one attention module, or LayoutError naming what does not fit."""
    linears = _linears(attn)
    d, h, hkv, dim = geo.head_dim, geo.num_heads, geo.num_kv_heads, geo.hidden_size
    o = _role(linears, "o")
    names = tuple(_role(linears, role) for role in ("q", "k", "v"))
    fused_width = (h + 2 * hkv) * d
    fused = None if all(names) else next(
        (n for n, m in linears.items() if (m.in_features, m.out_features) == (dim, fused_width)), None)
    if o is None or not (all(names) or fused):
        raise NotAttention(f"'{path}' ({type(attn).__name__}) has Linear children {', '.join(linears)} only")
    _check_shape(path, o, linears[o], (h * d, dim))
    qkv = None
    if all(names):
        qkv = (names[0], names[1], names[2])
        for role, width in zip(qkv, (h * d, hkv * d, hkv * d)):
            _check_shape(path, role, linears[role], (dim, width))
    scope = _norm_scope(attn, path, geo)
    known = {o, fused, *(qkv or ()), *(NORM_NAMES if scope else ())}
    unknown = [n for n, child in attn.named_children() if n not in known and any(True for _ in child.parameters())]
    unknown += [n for n, _ in attn.named_parameters(recurse=False)]
    if unknown:
        raise LayoutError(
            f"'{path}' ({type(attn).__name__}) has weights in {', '.join(repr(n) for n in unknown)} that attnshare "
            "does not know how to share or remove"
        )
    return AttentionLayout(name, qkv, o, fused, scope)


def _layer_attention(layer: nn.Module, path: str, geo: Geometry) -> AttentionLayout:
    """The attention child of one decoder layer: the first child with projections of the config's sizes."""
    for name, child in layer.named_children():
        if not _linears(child):
            continue
        try:
            return _attention_layout(name, child, f"{path}.{name}", geo)
        except NotAttention:
            continue
    children = ", ".join(n for n, _ in layer.named_children())
    raise LayoutError(
        f"no child of decoder layer '{path}' ({type(layer).__name__}: {children}) holds them for {geo.num_heads} "
        f"query and {geo.num_kv_heads} key/value heads of width {geo.head_dim}"
    )


def _decoder_layers(model: nn.Module, geo: Geometry) -> tuple[str, AttentionLayout]:
    """The dotted path of the ModuleList of decoder layers and the attention layout every layer shares."""
    lists = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == geo.num_layers]
    if not lists:
        raise LayoutError(f"{type(model).__name__} holds no ModuleList of {geo.num_layers} decoder layers")
    found, failures = [], []
    for path, layers in lists:
        try:
            found.append((path, _layer_attention(layers[0], f"{path}.0", geo)))
        except LayoutError as e:
            failures.append(str(e))
    if not found:
        raise LayoutError(failures[0])
    if len(found) > 1:
        raise LayoutError(f"several ModuleLists could be its decoder layers ({', '.join(p for p, _ in found)})")
    path, layout = found[0]
    for index, layer in enumerate(dict(model.named_modules())[path]):
        attn = getattr(layer, layout.attn, None)
        here = _attention_layout(layout.attn, attn, f"{path}.{index}.{layout.attn}", geo) if attn is not None else None
        if here != layout:
            raise LayoutError(f"decoder layer '{path}.{index}' is laid out differently from layer 0")
        if getattr(attn, "layer_idx", index) != index:
            raise LayoutError(f"'{path}.{index}.{layout.attn}' says it is layer {attn.layer_idx}")
    return path, layout


def derive(model: nn.Module) -> ArchSpec:
    """The ArchSpec of a causal LM, found from its modules, or a one-sentence AttnshareError naming what is not."""
    config = text_config(model)
    model_type = ALIASES.get(config.model_type, config.model_type)
    try:
        geo = config_geometry(config)
        path, layout = _decoder_layers(model, geo)
    except (LayoutError, AttributeError, TypeError) as e:
        raise AttnshareError(
            f"Model type '{config.model_type}' is not supported; supported types are: {supported_types()}, and any "
            f"other decoder whose layers hold Linear q/k/v (or fused qkv) and o projections, which this one lacks: "
            f"{e}."
        ) from e
    limits = fused_limits(layout.fused) if layout.fused else ()
    for key, why in CONFIG_LIMITS.items():
        value = getattr(config, key, None)
        if value is not None:
            limits += ((REPLACE_ATTENTION, why(value)),)
    return ArchSpec(model_type, layers=path, attn=layout.attn, qkv=layout.qkv, o=layout.o, fused=layout.fused,
                    qk_norm=layout.qk_norm_scope is not None, qk_norm_scope=layout.qk_norm_scope, limits=limits)


def arch_of(model_or_config) -> ArchSpec:
    """The ArchSpec of a model (found from its modules once, then kept on the model) or of a config.

    A bare config has no modules: it is answered from ``RECORDS`` (the tested families), and any other type asks
    for the model."""
    if isinstance(model_or_config, nn.Module):
        spec = model_or_config.__dict__.get(SPEC_ATTR)
        if spec is None:
            spec = derive(model_or_config)
            model_or_config.__dict__[SPEC_ATTR] = spec  # plain attribute: not a module, parameter or buffer
        return spec
    config = text_config(model_or_config)
    model_type = ALIASES.get(config.model_type, config.model_type)
    if model_type not in RECORDS:
        raise AttnshareError(
            f"Model type '{config.model_type}' is not supported; supported types are: {supported_types()}, and any "
            "decoder whose layers have the standard q/k/v/o attention layout, found from its modules (pass the "
            "model, not its config)."
        )
    return RECORDS[model_type]


def require(model: nn.Module, capability: str, method: str) -> None:
    """Refuse, in one sentence, to run ``method`` on a model whose family lacks ``capability``."""
    spec = arch_of(model)
    why = spec.limit(capability)
    if why is not None:
        raise AttnshareError(f"{method} cannot run on this {spec.model_type} model: {why}; {REMOVAL_ADVICE}.")


def geometry(model_or_config) -> Geometry:
    """Head counts and layer kinds read from a model's config (the model's layout is checked first)."""
    arch_of(model_or_config)
    return config_geometry(text_config(model_or_config))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers of a causal LM."""
    module = model
    for part in arch_of(model).layers.split("."):
        module = getattr(module, part)
    return module


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module that holds the decoder layers (embeddings, layers, final norm; no LM head): called with input ids
    it returns the last hidden states, for passes that only read what happens inside the layers."""
    module = model
    for part in arch_of(model).layers.split(".")[:-1]:
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
    names = (spec.q, spec.k) + (NORM_NAMES if spec.qk_norm else ())
    return sum(p.numel() for name in names if hasattr(module, name) for p in getattr(module, name).parameters())


def attention_parameters(model: nn.Module, layer: int) -> int:
    """Parameters of layer ``layer``'s whole attention module: what dropping it frees."""
    return sum(p.numel() for p in attention(model, layer).parameters())
