"""Registered attention functions ``attnshare_sdpa`` / ``attnshare_eager``.

Each delegates to the base implementation (HF's SDPA function, or our eager one) unless the attention module
carries an ``attnshare_hook``; the hook then computes the output *and* publishes what later layers reuse. The
matching mask function is registered too (without it HF would silently build no causal mask).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import AttnshareError
from ..hf_compat import attention_function, attn_implementation, register_attention
from .context import DonorState, ShareContext
from .functional import attention_scores, eager_attention, gqa_sdpa_attention, reachable_keys, softmax_probs

PREFIX = "attnshare_"
OWN = {"eager": eager_attention, "gqa_sdpa": gqa_sdpa_attention}  # base implementations of our own
BASES = ("sdpa", *OWN)
MASKS = {"gqa_sdpa": "sdpa"}  # whose mask function an implementation of our own takes (default: its own name)
HOOK = "attnshare_hook"


def base_function(base: str) -> Callable:
    return OWN[base] if base in OWN else attention_function(base)


def _dispatcher(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        fn = base_function(base)
        hook = getattr(module, HOOK, None)
        if hook is None:
            return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        return hook(module, fn, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    attention.__name__ = f"{PREFIX}{base}"
    return attention


def register(base: str) -> str:
    """Register ``attnshare_<base>`` (attention and mask functions); idempotent. Returns the name."""
    name = PREFIX + base
    register_attention(name, _dispatcher(base), mask_like=MASKS.get(base, base))
    return name


def base_implementation(model) -> str:
    return attn_implementation(model).removeprefix(PREFIX)


def install(model) -> None:
    """Route the model's attention through the attnshare dispatcher (keeps its base implementation)."""
    base = base_implementation(model)
    if base not in BASES:
        raise AttnshareError(
            f"Attention implementation '{base}' is not supported for sharing; load the model with "
            "attn_implementation='sdpa' or 'eager'."
        )
    model.set_attn_implementation(register(base))


def uninstall(model) -> None:
    base = base_implementation(model)
    model.set_attn_implementation(PREFIX + base if base in MASKS else base)  # ours stay registered under our prefix


def use_gqa_sdpa(model) -> bool:
    """Run an SDPA model's attention (shared or not) through :func:`gqa_sdpa_attention`, SDPA that never copies K/V
    per query head; whether it did (eager models keep theirs). The compiled fast path uses it for base and variants
    alike (HF's SDPA repeats a static cache's K/V at every compiled decode step); shared layers' hooks keep working."""
    if base_implementation(model) not in ("sdpa", "gqa_sdpa"):
        return False
    model.set_attn_implementation(register("gqa_sdpa"))
    return True


class Publisher:
    """Attention hook of a donor layer: computes the layer's own output and publishes its attention.

    Prefill publishes post-RoPE Q and K (receivers run fused SDPA over them, LiSA layers recompute score blocks
    from them); with gradients on, a consumer that needs scores (LiSA) gets them materialised instead. Decode
    (``Tq <= decode_rows``) publishes probability rows, which are tiny, so receivers never re-read the donor's K
    cache.
    """

    def __init__(self, context: ShareContext, layer: int, need_scores: bool = False, decode_rows: int = 1,
                 fused_prefill: bool = True) -> None:
        self.context = context
        self.layer = layer
        self.need_scores = need_scores
        self.decode_rows = decode_rows
        self.fused_prefill = fused_prefill

    def __call__(self, module, fn, q, k, v, mask, scaling=None, dropout=0.0, **kwargs):
        scaling = module.scaling if scaling is None else scaling
        k, v = reachable_keys(mask, q.shape[-2], k, v)  # a static cache's first prefill: its real keys only
        softcap = kwargs.get("softcap")
        needs_map = self.need_scores and torch.is_grad_enabled()  # autograd through a LiSA consumer's scores
        # SDPA has no logit soft-capping (Gemma-2): a soft-capped donor publishes its probabilities instead
        if self.fused_prefill and softcap is None and not needs_map and q.shape[-2] > self.decode_rows:
            out, weights = fn(module, q, k, v, mask, scaling=scaling, dropout=dropout, **kwargs)
            self.context.publish(self.layer, DonorState(q=q, k=k, mask=mask, scaling=scaling, softcap=softcap))
            return out, weights
        scores = attention_scores(q, k, mask, scaling, softcap)  # (B,H,Tq,S) float32
        probs = softmax_probs(scores, q.dtype)
        state = DonorState(probs=probs, scores=scores if self.need_scores else None, mask=mask, scaling=scaling,
                           softcap=softcap)
        self.context.publish(self.layer, state)
        out, _ = eager_attention(module, q, k, v, mask, scaling, dropout, softcap, probs=probs)
        return out, None


def set_hook(module: torch.nn.Module, hook) -> None:
    """Give an attention module a hook; a module that computes no attention (dropped) cannot have one."""
    if getattr(module, "computes_attention", True) is False:
        raise AttnshareError(
            f"Layer {module.layer_idx} computes no attention (it was dropped), so no other layer can reuse or record "
            "it; pick a layer that keeps its attention."
        )
    setattr(module, HOOK, hook)


def clear_hook(module: torch.nn.Module) -> None:
    if hasattr(module, HOOK):
        delattr(module, HOOK)
