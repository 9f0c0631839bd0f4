"""Every contact attnshare has with transformers beyond loading models and tokenizers, in one place.

The library is tested on the transformers range declared in ``pyproject.toml`` (its lower bound and the newest
release within it). Each difference between versions is handled here once, with a comment naming the version; no
other module imports from ``transformers.cache_utils``, ``transformers.masking_utils`` or ``transformers.models``,
names the cache keyword, or reads a cache slot's tensors.

Notation: B batch, Hkv key/value heads, S cached tokens, d key or value width.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from importlib import metadata

import torch
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache, DynamicLayer, StaticCache

log = logging.getLogger(__name__)

# 5.24 renamed the cache keyword of every model, decoder-layer and attention forward (and the output field) from
# ``past_key_values`` to ``cache``; earlier releases silently build a fresh cache when given ``cache=``.
CACHE_NAMES = ("cache", "past_key_values")


# ---- versions --------------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Installed versions of attnshare and of the packages whose range it declares (torch, transformers)."""
    out = {}
    for name in ("attnshare", "torch", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def declared_ranges() -> dict[str, str]:
    """The version ranges attnshare declares (= the ranges CI tests) for torch and transformers."""
    from packaging.requirements import Requirement

    ranges = {}
    try:
        requires = metadata.requires("attnshare") or []
    except metadata.PackageNotFoundError:
        return ranges
    for line in requires:
        req = Requirement(line)
        if req.name in ("torch", "transformers") and req.marker is None:
            lower_first = sorted(req.specifier, key=lambda spec: spec.operator.startswith("<"))
            ranges[req.name] = ",".join(str(spec) for spec in lower_first)
    return ranges


def untested_packages() -> list[str]:
    """'name version (tested: range)' for each installed package outside its declared range."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    have, out = versions(), []
    for name, spec in declared_ranges().items():
        try:
            inside = Version(have[name]) in SpecifierSet(spec, prereleases=True)
        except InvalidVersion:
            inside = False
        if not inside:
            out.append(f"{name} {have[name]} (tested: {spec})")
    return out


@functools.cache
def warn_if_untested() -> None:
    """Log one warning per process when torch or transformers lies outside the tested range (it still runs)."""
    outside = untested_packages()
    if outside:
        log.warning("attnshare is untested with %s; results may differ (see `attnshare --version`).",
                    ", ".join(outside))


def hide_hf_progress_bars() -> None:
    """Turn off transformers' own progress bars (weight loading) for this process."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# ---- the cache keyword -----------------------------------------------------------------------------------------


@functools.cache
def _forward_cache_name(forward: Callable) -> str:
    params = inspect.signature(forward).parameters  # follows the 5.24 deprecation wrapper (functools.wraps)
    return "cache" if "cache" in params else "past_key_values"


def cache_name(model) -> str:
    """The keyword under which ``model``'s forward (and generate) takes a cache: 'cache' from 5.24 on."""
    return _forward_cache_name(type(model).forward)


def with_cache(model, cache) -> dict:
    """``{name: cache}`` to pass to ``model(...)`` or ``model.generate(...)`` under the name it declares."""
    return {cache_name(model): cache}


def module_cache(kwargs: dict):
    """The cache a decoder layer handed to its attention module, under either name (5.24: ``cache``)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def output_cache(output):
    """The cache of a model output, read from its declared field (no deprecated property is touched)."""
    for name in CACHE_NAMES:
        if name in output.keys():  # noqa: SIM118 (5.24: `in` maps the old name to the new one, with a warning)
            return output[name]
    return None


# ---- cache objects ---------------------------------------------------------------------------------------------


def new_cache(model) -> DynamicCache:
    """An empty dynamic cache laid out for ``model`` (sliding layers get sliding slots)."""
    return DynamicCache(config=model.config)


def new_static_cache(model, max_len: int) -> StaticCache:
    """An empty static cache for ``model`` holding up to ``max_len`` tokens (sliding slots hold their window).

    Its slots allocate K and V from the shapes of their first update (5.17-5.25), so a shared layer's slot holds
    what the layer writes: a zero-width K (SA receivers, removed layers) or LiSA's low-rank k, as a dynamic slot
    would; ``generate(cache_implementation="static")`` builds the same cache."""
    return StaticCache(config=model.config, max_cache_len=max_len)


def compiled_generation() -> dict:
    """``generate`` keywords for the fast path: a static cache and each decode step compiled as one graph
    (``fullgraph``, static shapes; the prefill stays eager, as HF does). HF compiles by itself on CUDA only; 5.17-5.25
    enable every other device through ``CompileConfig``'s ``_compile_all_devices``."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False)
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


def reset_cache(cache) -> None:
    """Empty a cache in place, keeping its tensors (a static cache's buffers stay where a compiled graph saw them).

    Slots first filled under ``torch.inference_mode`` hold inference tensors, which only that mode may change."""
    with torch.inference_mode():
        cache.reset()


class ValueOnlyLayer(DynamicLayer):
    """A dynamic cache slot whose K is zero-width (an SA receiver's): its length is read off V.

    HF's DynamicLayer reads its length off K, and beam search and ``batch_repeat_interleave`` act on a slot only
    when that length is positive, so a V-only slot would otherwise keep the wrong beams' values.
    """

    def get_seq_length(self) -> int:
        return self.values.shape[-2] if self.is_initialized and self.values is not None else 0


def _ensure_slot(cache, layer_idx: int, make: Callable[[], object]) -> None:
    """Put ``make()`` in slot ``layer_idx`` if that slot is still a fresh plain dynamic slot (or does not exist yet:
    a cache built without a config appends its slots as layers first write)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return
    replicate = getattr(cache, "layer_class_to_replicate", None)
    if layer_idx >= len(layers):
        if replicate is not DynamicLayer:
            return
        while len(layers) < layer_idx:
            layers.append(replicate())
        layers.append(make())
    elif type(layers[layer_idx]) is DynamicLayer and not layers[layer_idx].is_initialized:
        layers[layer_idx] = make()


def update_value_only(cache, layer_idx: int, v: torch.Tensor) -> torch.Tensor:
    """Append V (B,Hkv,T,d) to slot ``layer_idx`` with a zero-width K (nothing stored for K); returns V (B,Hkv,S,d).

    A fresh plain slot becomes a :class:`ValueOnlyLayer` first; sliding slots count tokens themselves."""
    _ensure_slot(cache, layer_idx, ValueOnlyLayer)
    _, v = cache.update(v.new_empty(*v.shape[:-1], 0), v, layer_idx)
    return v


def update_length_only(cache, layer_idx: int, hidden: torch.Tensor, num_kv_heads: int) -> None:
    """Count hidden's T new tokens (B,T,D) in slot ``layer_idx`` while storing nothing: K and V are zero-width
    (B,Hkv,S,0), so positions, masks and beam reordering see the slot's length and it holds zero bytes."""
    b, t, _ = hidden.shape
    empty = hidden.new_empty(b, num_kv_heads, t, 0)
    _ensure_slot(cache, layer_idx, ValueOnlyLayer)
    cache.update(empty, empty, layer_idx)


def decoder_layer_output(hidden: torch.Tensor):
    """What a decoder layer's forward returns, given its output hidden states (B,T,D): in 5.17–5.25 the tensor
    itself (4.x returned a tuple)."""
    return hidden


def update_kv(cache, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
    """Append K (B,Hkv,T,dk) and V (B,Hkv,T,dv) to slot ``layer_idx``; returns the cached K and V (…,S,…)."""
    return cache.update(k, v, layer_idx)


def slot_start(cache, layer_idx: int, keys: int) -> int:
    """Index of the first token among the ``keys`` keys slot ``layer_idx`` returned on its latest update.

    A full-attention slot returns every token from the first (a static one also its unwritten tail): 0. A sliding
    slot returns its last ``keys`` tokens, or its whole window while it is not yet full: it counts the tokens it has
    seen (a static sliding slot in a python int, its tensor counter stops at the window). Python ints only, so a
    compiled forward reads no tensor here."""
    layer = cache.layers[layer_idx]
    if not getattr(layer, "is_sliding", False):
        return 0
    seen = getattr(layer, "cumulative_length_int", None)
    if seen is None:
        seen = layer.cumulative_length
    return max(seen - keys, 0)


def slot_tensors(cache) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """(K, V) of every slot of a cache, each (B,Hkv,S,d) or None where a slot holds nothing yet."""
    for layer in getattr(cache, "layers", ()):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        yield (k if isinstance(k, torch.Tensor) else None, v if isinstance(v, torch.Tensor) else None)


def tile_cache(cache, repeats: int) -> None:
    """Repeat every cached sequence ``repeats`` times along the batch, in place (public cache method)."""
    cache.batch_repeat_interleave(repeats)


def extend_cache(cache, length: int) -> None:
    """Benchmark helper: repeat each slot's cached tokens until it holds ``length`` tokens, in place.

    Only shapes matter for a decode-speed measurement; sliding slots keep their window as HF does. Caches have no
    public way to grow without a forward, so the slot's tensors and token counter are set here.
    """
    for layer in cache.layers:
        window = getattr(layer, "sliding_window", None)
        keep = length if window is None else min(length, window - 1)
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                reps = -(-keep // t.shape[-2])
                setattr(layer, name, t.repeat(1, 1, reps, 1)[:, :, :keep].contiguous())  # (B,Hkv,keep,d)
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = length


# ---- attention functions ---------------------------------------------------------------------------------------


def attention_function(name: str) -> Callable:
    """The registered attention function ``name`` ('sdpa', 'eager', ...)."""
    return AttentionInterface()[name]


def register_attention(name: str, function: Callable, mask_like: str) -> None:
    """Register ``function`` as attention implementation ``name``, with ``mask_like``'s mask function (without a
    mask function HF would silently build no causal mask for a custom name)."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, AttentionMaskInterface()[mask_like])


def lacks_attention_implementation(err: Exception) -> bool:
    """Whether ``from_pretrained`` refused the requested attention implementation for this model class (transformers
    5.24 and 5.25 refuse SDPA for Gemma-2 with a ValueError; 5.17 accepts it)."""
    return isinstance(err, ValueError) and "does not support an attention implementation" in str(err)


def attn_implementation(model) -> str:
    """The model's attention implementation name (the config has no public getter in 5.17–5.25)."""
    return model.config._attn_implementation or "eager"


# ---- the LM head's input ---------------------------------------------------------------------------------------


def head_input(model, ids: torch.Tensor, *, logits: bool = False, **kwargs):
    """``(h, output)``: the LM head's input of every position, h (B,T,D) (the decoder's ``last_hidden_state``, final
    norm included), and the model's output (``kwargs`` go to the forward).

    Without ``logits`` the head runs on the last position only (``logits_to_keep=1``, in every 5.x causal LM), so
    the cost does not grow with the vocabulary. ``model`` may be a DistributedDataParallel wrapper (``.module``):
    it is called through the wrapper, so gradient synchronisation still happens."""
    inner = getattr(model, "module", model)
    seen: list[torch.Tensor] = []
    handle = inner.get_decoder().register_forward_hook(lambda _m, _a, out: seen.append(out.last_hidden_state))
    try:
        out = model(input_ids=ids, use_cache=False, **({} if logits else {"logits_to_keep": 1}), **kwargs)
    finally:
        handle.remove()
    return seen[-1], out
