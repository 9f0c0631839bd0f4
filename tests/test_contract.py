"""The contract every sharing method keeps on every supported architecture.

Rows: ``METHODS``, one :class:`Entry` per method or composition. Columns: ``conftest.ARCH_NAMES``, one tiny 4-layer
GQA model each (Gemma3 alternates sliding and full layers). Each test is one property, so a failure reads
``test_<property>[<method>-<arch>]``:

1. the neutral plan leaves the model the base model, bit for bit (fp32);
2. cached greedy ``generate`` (32 new tokens) == step-by-step argmax decoding without a cache;
3. cached beam search == the same beam search without a cache;
4. a left-padded batch == each prompt alone (last logits, greedy continuation);
   (2-4 with HF's dynamic cache and with its static cache, ``cache_implementation="static"``)
5. KV-cache tensors (dynamic and static) and parameter counts equal formulas written from the config and the plan;
6. save -> load (onto a given base, and from the artifact alone) reproduces the logits bit for bit;
7. unapply restores the base model bit for bit (originals kept, and freed weights reloaded from the base);
8. ``torch.compile(fullgraph=True)`` traces the forward without a graph break, in a prefill (without a cache and
   into a static cache) and in static-cache decode steps, and the compiled logits equal eager ones.

A new method joins with one ``Entry`` in ``METHODS``; a new architecture with one name in ``conftest.ARCH_NAMES``.
Untrained modules are moved off their initialisation by ``Entry.perturb`` so the contract sees non-trivial weights.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import ARCH_NAMES, tiny_checkpoint
from helpers import (
    cache_keyword,
    cache_layer_bytes,
    cached_forward,
    greedy_generate,
    greedy_no_cache,
    left_pad,
    logits,
    random_ids,
)
from torch import nn

import attnshare
from attnshare.arch import geometry
from attnshare.methods.directshare import DirectShareConfig, DirectSharePlan
from attnshare.methods.drop import DropPlan
from attnshare.methods.layerdrop import LayerDropPlan
from attnshare.methods.lisa import LiSAConfig, LiSAPlan
from attnshare.methods.mix import MixPlan
from attnshare.methods.postshare import PostShareConfig
from attnshare.methods.sa import SAPlan
from attnshare.methods.sa.plan import nearest_donors
from attnshare.plan import Plan

IDS = random_ids(2, 24)  # logits probe

# ------------------------------------------------------------------------------------ dimensions of a base model


@dataclass(frozen=True)
class Dims:
    """What the formulas need, read off the model config (and, for facts some configs do not carry, the base
    model's own Hugging Face modules: Qwen2's hard-wired q/k/v biases, Qwen3/Gemma3's per-head q/k norms (d weights
    each), OLMo-2's q/k norms over the whole projections (H*d and Hkv*d weights), Phi-3's fused qkv_proj)."""

    L: int  # layers
    D: int  # hidden size
    H: int  # query heads
    Hkv: int  # key/value heads
    d: int  # head dim
    layer_types: tuple[str, ...]
    window: int | None  # sliding window of sliding layers
    qkv_bias: bool
    qk_norm: bool
    qk_norm_params: int  # one layer's q_norm + k_norm weights: 2d per head-wise norm, (H + Hkv)d over projections
    block_params: int  # one decoder block's parameters (attention, MLP, norms), read off the base's modules

    @classmethod
    def of(cls, model: nn.Module) -> Dims:
        c = model.config
        L, H = c.num_hidden_layers, c.num_attention_heads
        attn = model.model.layers[0].self_attn
        q = getattr(attn, "q_proj", None) or attn.qkv_proj  # Phi-3: one fused q/k/v projection
        norms = [getattr(attn, name) for name in ("q_norm", "k_norm") if hasattr(attn, name)]
        return cls(L=L, D=c.hidden_size, H=H, Hkv=c.num_key_value_heads,
                   d=getattr(c, "head_dim", None) or c.hidden_size // H,
                   layer_types=tuple(getattr(c, "layer_types", None) or ["full_attention"] * L),
                   window=getattr(c, "sliding_window", None), qkv_bias=q.bias is not None,
                   qk_norm=bool(norms), qk_norm_params=sum(p.numel() for n in norms for p in n.parameters()),
                   block_params=sum(p.numel() for p in model.model.layers[0].parameters()))

    @property
    def G(self) -> int:
        return self.H // self.Hkv

    @property
    def U(self) -> int:
        """DirectShare units per layer: KV groups under GQA (heads for MHA, where Hkv == H)."""
        return self.Hkv

    def kept(self, layer: int, tokens: int) -> int:
        """Tokens an HF dynamic cache slot holds after ``tokens`` tokens: a sliding slot keeps the last window - 1."""
        if self.layer_types[layer] == "sliding_attention" and self.window:
            return min(tokens, self.window - 1)
        return tokens

    def static_kept(self, layer: int, max_len: int) -> int:
        """Tokens an HF static cache slot of ``max_len`` preallocates: a sliding slot its window."""
        if self.layer_types[layer] == "sliding_attention" and self.window:
            return min(max_len, self.window)
        return max_len

    def qk_params(self) -> int:
        """One layer's q_proj + k_proj (+ biases) + q/k norms."""
        return (self.H + self.Hkv) * self.d * (self.D + self.qkv_bias) + self.qk_norm_params

    def attention_params(self) -> int:
        """One standard attention module: q, k, v, o (o has no bias in any supported architecture)."""
        return self.qk_params() + self.Hkv * self.d * (self.D + self.qkv_bias) + self.D * self.H * self.d


# ------------------------------------------------------------------------------------ expectations from the plan


def sa_key_widths(dims: Dims, plans: list[Plan]) -> dict[int, int]:
    """SA receivers cache V only: their K is zero-width."""
    return {r: 0 for p in plans if isinstance(p, SAPlan) for r in p.donors}


def lisa_key_widths(dims: Dims, plans: list[Plan]) -> dict[int, int]:
    """LiSA layers cache k_lr, Hkv x r per token, instead of Hkv x d."""
    return {layer: p.rank for p in plans if isinstance(p, LiSAPlan) for layer in p.layers}


def no_key_change(dims: Dims, plans: list[Plan]) -> dict[int, int]:
    return {}


def parts(plans: list[Plan]) -> list[Plan]:
    """Plans with each mix plan split into its drop and SA parts."""
    return [q for p in plans for q in (p.parts() if isinstance(p, MixPlan) else [p])]


def removed_layers(plans: list[Plan]) -> set[int]:
    return {layer for p in parts(plans) if isinstance(p, DropPlan) for layer in p.layers}  # LayerDropPlan too


def removal_widths(dims: Dims, plans: list[Plan]) -> dict[int, int]:
    """A removed attention (drop) or block (layerdrop) caches zero-width K and V: a token count, zero bytes."""
    return {layer: 0 for layer in removed_layers(plans)}


def removal_and_sa_key_widths(dims: Dims, plans: list[Plan]) -> dict[int, int]:
    return {**sa_key_widths(dims, parts(plans)), **removal_widths(dims, plans)}


def drop_delta(dims: Dims, plans: list[Plan]) -> int:
    """A dropped layer loses its whole attention (q, k, v, o, norms); a removed block loses everything."""
    blocks = {layer for p in plans if isinstance(p, LayerDropPlan) for layer in p.layers}
    attention_only = removed_layers(plans) - blocks
    return -len(attention_only) * dims.attention_params() - len(blocks) * dims.block_params


def drop_and_sa_delta(dims: Dims, plans: list[Plan]) -> int:
    return drop_delta(dims, plans) + stored_weights_delta(dims, parts(plans))


def head_roots(plan: DirectSharePlan, G: int) -> tuple[dict, dict]:
    """A DirectShare plan as per-head maps: (layer, query head) -> root query head, (layer, KV head) -> root KV
    head. A KV-group pair moves its G query heads and its KV head; split plans list both kinds of pairs."""
    if plan.granularity == "split":
        return {(l, h): (rl, rh) for l, h, rl, rh in plan.q_pairs}, {(l, g): (rl, rg) for l, g, rl, rg in plan.pairs}
    q = {(l, u * G + i): (rl, ru * G + i) for l, u, rl, ru in plan.pairs for i in range(G)}
    return q, {(l, u): (rl, ru) for l, u, rl, ru in plan.pairs}


def stored_weights_delta(dims: Dims, plans: list[Plan]) -> int:
    """Weight sharing (DirectShare/PostShare pairs) and SA receivers, alone or composed: every q/k/v (and, with
    share_o, o) head slice is stored once, and a slice nothing reads any more is gone.

    A replaced head stores none of its shared slices (they are its root's); an SA receiver reads no q/k, so a q/k
    slice survives only if a non-receiver layer uses it (its own, or as root). Per-head q/k norms (d weights each)
    likewise: with ``norms="donor"`` a layer all of whose query (KV) heads reuse heads of one layer runs that
    layer's q_norm (k_norm), so a norm survives only if a non-receiver layer runs it; norms over the whole
    projection stay with their layer, and receivers lose theirs.
    """
    q_root, kv_root, share_o, travel = {}, {}, False, False
    for p in plans:
        if isinstance(p, DirectSharePlan):
            q_root, kv_root = head_roots(p, dims.G)
            share_o, travel = p.share_o, p.norms == "donor"
    receivers = {r for p in plans if isinstance(p, SAPlan) for r in p.donors}
    row = dims.d * (dims.D + dims.qkv_bias)  # one head's rows (and biases) of q, k or v
    q_heads = [(l, h) for l in range(dims.L) for h in range(dims.H)]
    kv_heads = [(l, g) for l in range(dims.L) for g in range(dims.Hkv)]
    read_q = {q_root.get(lh, lh) for lh in q_heads if lh[0] not in receivers}
    read_k = {kv_root.get(lg, lg) for lg in kv_heads if lg[0] not in receivers}
    stored_v = set(kv_heads) - set(kv_root)
    stored_o = set(q_heads) - set(q_root) if share_o else set(q_heads)
    o_cols = dims.D * dims.d  # one head's o columns (o's bias belongs to the layer)
    before = (len(q_heads) + 2 * len(kv_heads)) * row + len(q_heads) * o_cols
    after = (len(read_q) + len(read_k) + len(stored_v)) * row + len(stored_o) * o_cols
    if dims.qk_norm_params != 2 * dims.d:  # no norms, or norms over the whole projection: they stay with the layer
        return after - before - len(receivers) * dims.qk_norm_params
    norms = 0
    for root, heads in ((q_root, dims.H), (kv_root, dims.Hkv)):
        lender = {}  # layer -> the one other layer all its heads read
        for l in range(dims.L):
            layers = {root.get((l, h), (l, h))[0] for h in range(heads)}
            if len(layers) == 1 and l not in layers:
                lender[l] = layers.pop()
        norms += len({lender.get(l, l) if travel else l for l in range(dims.L) if l not in receivers}) - dims.L
    return after - before + norms * dims.d


def lisa_delta(dims: Dims, plans: list[Plan]) -> int:
    """A LiSA layer loses q/k (and norms), gains lisa_q (D x H*r), lisa_k (D x Hkv*r) and the head FFN
    (skip H x H; with width w: up wH x H, its bias wH, down H x wH)."""
    delta = 0
    for p in plans:
        if isinstance(p, LiSAPlan):
            m = p.ffn_width * dims.H
            added = dims.D * (dims.H + dims.Hkv) * p.rank + dims.H * dims.H + (m * dims.H + m + dims.H * m if m else 0)
            delta += len(p.layers) * (added - dims.qk_params())
    return delta


# ------------------------------------------------------------------------------------------------ the methods


def no_perturb(model: nn.Module) -> None:
    pass


def perturb_lisa(model: nn.Module, scale: float = 0.3) -> None:
    """Move every new LiSA tensor off its initialisation (seeded): a non-zero low-rank correction (lisa_k starts at
    zero) and a head FFN that is no longer a permutation, as training would."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lisa_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def no_tensors(model: nn.Module) -> set[str]:
    return set()


def lisa_tensors(model: nn.Module) -> set[str]:
    """LiSA artifacts hold every new LiSA tensor (trained or not) and no base weight."""
    return {n for n, _ in model.named_parameters() if ".lisa_" in n}


@dataclass(frozen=True, repr=False)
class Entry:
    """One method (or composition) under the contract; each callable is one small function, named in METHODS."""

    name: str
    plans: Callable[[nn.Module], list[Plan]]  # the plans under test, made on the unchanged base model
    neutral: Callable[[nn.Module], list[Plan]]  # plans that must leave the model exactly the base
    key_widths: Callable[[Dims, list[Plan]], dict[int, int]]  # cached K width per kv head of each changed layer
    param_delta: Callable[[Dims, list[Plan]], int]  # num_parameters() after apply minus before
    perturb: Callable[[nn.Module], None] = no_perturb  # after apply: move untrained new modules off their init
    artifact_tensors: Callable[[nn.Module], set[str]] = no_tensors  # tensor names the saved artifact must hold
    value_widths: Callable[[Dims, list[Plan]], dict[int, int]] = no_key_change  # cached V width, changed layers

    def __repr__(self) -> str:
        return self.name


RECEIVERS = [2, 3]  # SA receivers; donors are the nearest earlier layer of the same window kind
FLIPPED = {2: [3, 2, 1, 0], 3: [1, 0, 3, 2]}  # SA aligned: receiver head h reads donor head FLIPPED[r][h]
LISA_MAPS = {1: [1, 0, 3, 2], 2: [2, 3, 0, 1], 3: [3, 2, 1, 0]}  # LiSA layers 1..3 chain: each reads layer l-1


def sa(aligned: bool = False) -> Callable[[nn.Module], list[Plan]]:
    def make(model):
        head_map = {r: FLIPPED[r] for r in RECEIVERS} if aligned else {}
        return [SAPlan(donors=nearest_donors(RECEIVERS, geometry(model)), head_map=head_map)]
    return make


def lisa(**kw) -> Callable[[nn.Module], list[Plan]]:
    return lambda model: [LiSAPlan(layers=sorted(LISA_MAPS), head_map=dict(LISA_MAPS), rank=4, ffn_width=2, **kw)]


def lisa_fitted(model: nn.Module) -> list[Plan]:
    """LiSA with the fitted start (``--init fit``), fitted on the tiny model's calibration bytes."""
    config = LiSAConfig(layers=sorted(LISA_MAPS), rank=4, init="fit")
    return [attnshare.get_method("lisa").make_plan(model, config)]


def directshare(ratio: float = 0.5, **kw) -> Callable[[nn.Module], list[Plan]]:
    return lambda model: [attnshare.get_method("directshare").make_plan(model, DirectShareConfig(ratio=ratio, **kw))]


def postshare(ratio: float = 0.5, **kw) -> Callable[[nn.Module], list[Plan]]:
    """PostShare's plan applied as is (its post-training, tested in test_postshare.py, only moves weights first)."""
    return lambda model: [attnshare.get_method("postshare").make_plan(model, PostShareConfig(ratio=ratio, **kw))]


DROPPED = [0, 2]  # layer 0 included: its slot is the one HF reads the cache length from


def drop(layers: list[int] = DROPPED) -> Callable[[nn.Module], list[Plan]]:
    return lambda model: [DropPlan(layers=list(layers))]


def layerdrop(layers: list[int] = DROPPED) -> Callable[[nn.Module], list[Plan]]:
    return lambda model: [LayerDropPlan(layers=list(layers))]


def drop_then_sa(model: nn.Module) -> list[Plan]:
    """Layer 2 dropped; SA receiver 3 reuses the nearest earlier layer of its kind that still computes attention
    (layer 1: on the uniform architectures the nearest, 2, is the dropped one)."""
    donors = nearest_donors([3], geometry(model), unavailable=frozenset({2}))
    return [DropPlan(layers=[2]), SAPlan(donors=donors)]


def then(*makers) -> Callable[[nn.Module], list[Plan]]:
    """Plans of several makers, all made on the unchanged base, applied in order (composition)."""
    return lambda model: [p for make in makers for p in make(model)]


METHODS = [
    Entry("sa", sa(), lambda m: [SAPlan()], sa_key_widths, stored_weights_delta),
    Entry("sa_aligned", sa(aligned=True), lambda m: [SAPlan()], sa_key_widths, stored_weights_delta),
    Entry("lisa", lisa(), lambda m: [LiSAPlan()], lisa_key_widths, lisa_delta, perturb_lisa, lisa_tensors),
    Entry("lisa_probs", lisa(source="probs", rope=False), lambda m: [LiSAPlan(source="probs", rope=False)],
          lisa_key_widths, lisa_delta, perturb_lisa, lisa_tensors),
    Entry("lisa_fit", lisa_fitted, lambda m: [LiSAPlan(init="fit")], lisa_key_widths, lisa_delta, perturb_lisa,
          lisa_tensors),
    Entry("directshare", directshare(match="qkv", share_o=True), directshare(ratio=0.0), no_key_change,
          stored_weights_delta),
    Entry("directshare_split", directshare(granularity="split", share_o=True),
          directshare(ratio=0.0, granularity="split"), no_key_change, stored_weights_delta),
    Entry("postshare", postshare(), postshare(ratio=0.0), no_key_change, stored_weights_delta),
    Entry("directshare+sa", then(directshare(share_o=True), sa()), then(directshare(ratio=0.0), lambda m: [SAPlan()]),
          sa_key_widths, stored_weights_delta),
    Entry("drop", drop(), lambda m: [DropPlan()], removal_widths, drop_delta, value_widths=removal_widths),
    Entry("layerdrop", layerdrop(), lambda m: [LayerDropPlan()], removal_widths, drop_delta,
          value_widths=removal_widths),
    Entry("mix", lambda m: [MixPlan(drop=[2], donors=nearest_donors([3], geometry(m), frozenset({2})),
                                    head_map={3: FLIPPED[3]})],
          lambda m: [MixPlan()], removal_and_sa_key_widths, drop_and_sa_delta, value_widths=removal_widths),
    Entry("drop+sa", drop_then_sa, lambda m: [DropPlan(), SAPlan()], removal_and_sa_key_widths, drop_and_sa_delta,
          value_widths=removal_widths),
]

CASES = [pytest.param(entry, arch, id=f"{entry.name}-{arch}") for entry in METHODS for arch in ARCH_NAMES]
contract = pytest.mark.parametrize("entry, arch", CASES)


# ------------------------------------------------------------------------------------------------ base models


@dataclass
class Base:
    """One architecture's base model, loaded from a tiny checkpoint folder (so its identity names the folder and
    artifacts and unapply can reload it by themselves). ``model`` is never changed: tests use copies."""

    folder: Path
    model: nn.Module
    dims: Dims
    logits: torch.Tensor  # of IDS

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.model)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Callable[[str], Base]:
    made: dict[str, Base] = {}

    def get(arch: str) -> Base:
        if arch not in made:
            folder = tiny_checkpoint(tmp_path_factory.mktemp(f"base-{arch}"), arch)
            model, _ = attnshare.load_model(str(folder))
            made[arch] = Base(folder, model, Dims.of(model), logits(model, IDS))
        return made[arch]

    return get


def shared(entry: Entry, base: Base, **kw) -> tuple[nn.Module, list[Plan]]:
    """A copy of the base with the entry's plans applied (and its new modules perturbed)."""
    model = base.fresh()
    plans = entry.plans(model)
    attnshare.apply(model, plans, **kw)
    entry.perturb(model)
    return model, plans


# ---------------------------------------------------------------------------------------------------- 1. neutral


@contract
def test_neutral_plan_is_the_base_exactly(entry, arch, bases):
    base = bases(arch)
    model = base.fresh()
    attnshare.apply(model, entry.neutral(model))
    assert torch.equal(logits(model, IDS), base.logits)
    got, cache = cached_forward(model, IDS)
    want, base_cache = cached_forward(base.model, IDS)
    assert torch.equal(got, want)
    assert cache_layer_bytes(cache) == cache_layer_bytes(base_cache)
    assert model.num_parameters() == base.model.num_parameters()
    changed, _ = shared(entry, base)  # guard: the entry's real plan is not neutral, or the rest proves nothing
    assert not torch.equal(logits(changed, IDS), base.logits), f"{entry.name}'s plan leaves the model unchanged"


# ------------------------------------------------------------------------------------------------- 2. greedy


CACHES = {"dynamic": {}, "static": {"cache_implementation": "static"}}  # generate's keywords for each cache kind
caches = pytest.mark.parametrize("cache", list(CACHES))


@caches
@contract
def test_cached_greedy_generate_equals_no_cache_decoding(entry, arch, cache, bases):
    model, _ = shared(entry, bases(arch))
    ids = random_ids(2, 10, seed=1)  # 10 + 32 tokens: far past Gemma3's sliding window of 8
    assert torch.equal(greedy_generate(model, ids, 32, **CACHES[cache]), greedy_no_cache(model, ids, 32))


# --------------------------------------------------------------------------------------------------- 3. beams


@caches
@contract
def test_cached_beam_search_equals_no_cache(entry, arch, cache, bases):
    """Beam search reorders every cache slot (V-only, low-rank K or plain) and must keep them consistent."""
    model, _ = shared(entry, bases(arch))
    ids = random_ids(2, 7, seed=3)
    kw = {"attention_mask": torch.ones_like(ids), "num_beams": 3, "max_new_tokens": 6, "do_sample": False,
          "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw, **CACHES[cache]), model.generate(ids, **kw, use_cache=False))


# ------------------------------------------------------------------------------------------------- 4. padding


@caches
@contract
def test_left_padded_batch_equals_each_prompt_alone(entry, arch, cache, bases):
    model, _ = shared(entry, bases(arch))
    prompts = [random_ids(1, 7, seed=2)[0], random_ids(1, 12, seed=1)[0]]
    ids, mask = left_pad(prompts)  # row 0 has 5 pads
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    steps = 10
    kw = {"max_new_tokens": steps, "min_new_tokens": steps, "do_sample": False, "pad_token_id": 0,
          "eos_token_id": None}
    with torch.no_grad():
        last = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
        both = model.generate(ids, attention_mask=mask, **kw, **CACHES[cache])
    for row, prompt in enumerate(prompts):
        alone = prompt.unsqueeze(0)
        torch.testing.assert_close(last[row], logits(model, alone)[0, -1], rtol=1e-4, atol=1e-4)
        assert torch.equal(both[row, -steps:], greedy_generate(model, alone, steps)[0, -steps:]), f"row {row}"


# ------------------------------------------------------------------------------------------------ 5. savings


def expected_slots(dims: Dims, widths: dict[int, int], batch: int, tokens: int,
                   value_widths: dict[int, int] | None = None, static: bool = False) -> list[tuple[tuple, tuple]]:
    """(K shape, V shape) of every cache slot: K is (B, Hkv, kept, width), V is (B, Hkv, kept, d or its width);
    ``static``: the slots of a static cache of ``tokens`` slots."""
    value_widths = value_widths or {}
    slots = []
    for layer in range(dims.L):
        kept = dims.static_kept(layer, tokens) if static else dims.kept(layer, tokens)
        slots.append(((batch, dims.Hkv, kept, widths.get(layer, dims.d)),
                      (batch, dims.Hkv, kept, value_widths.get(layer, dims.d))))
    return slots


def slot_shapes(cache) -> list[tuple[tuple, tuple]]:
    return [(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in cache.layers]


def slot_bytes(slots: list[tuple[tuple, tuple]], element_size: int = 4) -> list[int]:
    return [(torch.Size(k).numel() + torch.Size(v).numel()) * element_size for k, v in slots]


@contract
def test_kv_cache_bytes_exact(entry, arch, bases):
    """After a 20-token prefill (past Gemma3's window) and one decode step, each slot holds exactly what the
    plan says: SA receivers V only, LiSA layers k_lr of width r, DirectShare/PostShare an unchanged cache."""
    base = bases(arch)
    dims = base.dims
    batch, tokens = 2, 20
    ids = random_ids(batch, tokens + 1, seed=4)
    _, base_cache = cached_forward(base.model, ids[:, :tokens])
    assert slot_shapes(base_cache) == expected_slots(dims, {}, batch, tokens)  # the formula itself, on the base
    model, plans = shared(entry, base)
    widths, value_widths = entry.key_widths(dims, plans), entry.value_widths(dims, plans)
    _, cache = cached_forward(model, ids[:, :tokens])
    for n in (tokens, tokens + 1):
        want = expected_slots(dims, widths, batch, n, value_widths)
        assert slot_shapes(cache) == want, f"after {n} tokens"
        assert cache_layer_bytes(cache) == slot_bytes(want), f"after {n} tokens"
        if n == tokens:
            _, cache = cached_forward(model, ids[:, tokens:], cache=cache)


@contract
def test_static_cache_bytes_exact(entry, arch, bases):
    """A static cache preallocates every slot, and each holds exactly the widths the plan says (an SA receiver no
    K, a LiSA layer k_lr of width r, a removed layer nothing), before and after a decode step."""
    from transformers import StaticCache

    base = bases(arch)
    dims = base.dims
    batch, tokens, max_len = 2, 12, 24
    ids = random_ids(batch, tokens + 1, seed=4)
    model, plans = shared(entry, base)
    want = expected_slots(dims, entry.key_widths(dims, plans), batch, max_len, entry.value_widths(dims, plans),
                          static=True)
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    _, cache = cached_forward(model, ids[:, :tokens], cache=cache)
    assert slot_shapes(cache) == want
    assert cache_layer_bytes(cache) == slot_bytes(want)
    _, cache = cached_forward(model, ids[:, tokens:], cache=cache)
    assert slot_shapes(cache) == want, "after a decode step"


@contract
def test_parameter_count_exact(entry, arch, bases):
    """num_parameters() moves by exactly the plan's formula, and the parameters hold exactly that much memory
    (freed weights are really freed; shared slices are stored once)."""
    base = bases(arch)
    dims = base.dims
    attn0 = base.model.model.layers[0].self_attn
    assert sum(p.numel() for p in attn0.parameters()) == dims.attention_params()  # the formulas, on the base
    before = base.model.num_parameters()
    model, plans = shared(entry, base)
    after = before + entry.param_delta(dims, plans)
    assert model.num_parameters() == after
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert not any(p.is_meta for p in model.parameters())
    assert sum(storages.values()) == after * 4  # fp32


# ----------------------------------------------------------------------------------------------- 6. artifacts


@contract
def test_save_load_reproduces_logits(entry, arch, bases, tmp_path):
    base = bases(arch)
    model, plans = shared(entry, base)
    ref = logits(model, IDS)
    out = attnshare.save(model, tmp_path / "art")
    meta = json.loads((out / "attnshare.json").read_text())
    assert meta["plans"] == [p.to_dict() for p in plans]
    expected = entry.artifact_tensors(model)
    assert set(meta["tensors"]) == expected  # never base weights
    assert (out / "params.safetensors").exists() == bool(expected)
    onto, tok = attnshare.load(out, model=base.fresh())
    alone, tok_alone = attnshare.load(out)  # the base model found from the artifact's identity
    assert tok is None and tok_alone is not None
    for loaded in (onto, alone):
        assert torch.equal(logits(loaded, IDS), ref)
        assert attnshare.applied_plans(loaded) == plans
        assert loaded.num_parameters() == model.num_parameters()


# ------------------------------------------------------------------------------------------------- 7. unapply


@contract
def test_unapply_restores_the_base_exactly(entry, arch, bases):
    """With the originals kept, and with freed weights reloaded from the base checkpoint."""
    base = bases(arch)
    state = base.model.state_dict()
    ids = random_ids(2, 10, seed=1)
    base_tokens = greedy_generate(base.model, ids, 8)
    for keep in (True, False):
        model, _ = shared(entry, base, keep_originals=keep)
        cached_forward(model, IDS)  # a shared forward first: publish, cache, context
        attnshare.unapply(model)
        assert torch.equal(logits(model, IDS), base.logits), f"keep_originals={keep}"
        restored = model.state_dict()
        assert sorted(restored) == sorted(state)  # (module order may differ: reattached modules come last)
        assert all(torch.equal(restored[k], v) for k, v in state.items()), f"keep_originals={keep}"
        assert model.num_parameters() == base.model.num_parameters()
        assert model.config._attn_implementation == base.model.config._attn_implementation  # the base's own
        assert not hasattr(model, "attnshare_state")
        assert not any(hasattr(m, "attnshare_hook") for m in model.modules())
        assert torch.equal(greedy_generate(model, ids, 8), base_tokens), f"keep_originals={keep}"


# ------------------------------------------------------------------------------------------------- 8. compile

COMPILE_ARCH = "gemma3_text"  # the hardest tiny layout: sliding and full layers, different RoPE bases, q/k norms


@pytest.mark.parametrize("entry", METHODS, ids=str)
def test_compiled_forward_has_no_graph_break_and_equals_eager(entry, bases, monkeypatch):
    """``fullgraph=True`` fails on any graph break. Dynamo's own ``eager`` backend runs the traced graph as is, so
    this checks what the compiler sees (the donor hand-off, the cache slots, LiSA's query blocks) at test speed;
    inductor's code generation is exercised on the real model by ``attnshare bench --compile``."""
    from transformers import StaticCache

    model, _ = shared(entry, bases(COMPILE_ARCH))
    for module in model.modules():
        if hasattr(module, "block_rows") and module.block_rows:
            module.block_rows = 8  # LiSA's blockwise prefill: 3 query blocks of a 20-token prompt
    monkeypatch.setattr("attnshare.methods.lisa.modules.COMPILED_BLOCK_ROWS", 8)  # compiled too
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
    ids = random_ids(2, 20, seed=5)
    caches = [StaticCache(config=model.config, max_cache_len=24) for _ in range(2)]  # compiled, eager
    cached_forward(model, ids[:, :1], cache=caches[0])  # slots laid out eagerly first, as HF advises: a compiled
    caches[0].reset()  # graph that allocated them would be replaced once they exist
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids, use_cache=False).logits, logits(model, ids))
        got = compiled(input_ids=ids, use_cache=True, **{cache_keyword(model): caches[0]}).logits
        want, _ = cached_forward(model, ids, cache=caches[1])
        torch.testing.assert_close(got, want)
        for step in range(3):  # past Gemma3's window of 8 and into the decode graph twice (no recompilation needed)
            nxt = want[:, -1:].argmax(-1)
            got = compiled(input_ids=nxt, use_cache=True, **{cache_keyword(model): caches[0]}).logits
            want, _ = cached_forward(model, nxt, cache=caches[1])
            torch.testing.assert_close(got, want, msg=lambda m, step=step: f"decode step {step}: {m}")


@pytest.mark.parametrize("entry", METHODS, ids=str)
def test_gqa_sdpa_fast_path_equals_hf_sdpa(entry, bases):
    """The compiled fast path's attention (SDPA with the query heads mapped onto KV heads, no K/V copy) gives the
    logits HF's SDPA gives, shared layers' hooks included, on a dynamic and a static cache."""
    from attnshare.attention.dispatch import use_gqa_sdpa

    model, _ = shared(entry, bases("gemma3_text"))  # GQA, sliding and full layers
    ids = random_ids(2, 10, seed=1)
    want = [logits(model, IDS), greedy_generate(model, ids, 12), greedy_generate(model, ids, 12, **CACHES["static"])]
    assert use_gqa_sdpa(model)
    torch.testing.assert_close(logits(model, IDS), want[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(greedy_generate(model, ids, 12), want[1])
    assert torch.equal(greedy_generate(model, ids, 12, **CACHES["static"]), want[2])


def test_inductor_compiled_decode_equals_eager(bases):
    """The CPU inductor backend generates code for a shared decode step (SA receivers reading a donor's
    probabilities, LiSA layers reading low-rank k from the same static cache) that matches eager, with the fast
    path's compile settings (weights frozen into the graph, GEMMs autotuned against inductor's C++ kernels), which
    are in force only while the fast path compiles."""
    from torch._inductor import config as inductor_config
    from transformers import StaticCache

    from attnshare.sharing.apply import CPU_COMPILE_SETTINGS, compile_fast_path, fast_path_compiling

    model = bases("llama").fresh()
    attnshare.apply(model, [SAPlan(donors={3: 2}), LiSAPlan(layers=[1, 2], head_map={1: LISA_MAPS[1], 2: LISA_MAPS[2]},
                                                             rank=4, ffn_width=2)])
    perturb_lisa(model)
    torch._dynamo.reset()
    def settings() -> dict:
        return {name: getattr(inductor_config, name) for name in CPU_COMPILE_SETTINGS}

    defaults = settings()
    with fast_path_compiling(torch.device("cpu")):
        assert settings() == CPU_COMPILE_SETTINGS
    with fast_path_compiling(torch.device("cpu"), autotune=False):  # bench/generate --no-autotune
        assert settings() == defaults
    assert settings() == defaults != CPU_COMPILE_SETTINGS
    compiled = compile_fast_path(model.forward, torch.device("cpu"))
    ids = random_ids(2, 12, seed=6)
    caches = [StaticCache(config=model.config, max_cache_len=16) for _ in range(2)]
    with torch.no_grad():
        want, _ = cached_forward(model, ids, cache=caches[0])
        cached_forward(model, ids, cache=caches[1])
        for _ in range(2):
            nxt = want[:, -1:].argmax(-1)
            got = compiled(input_ids=nxt, use_cache=True, **{cache_keyword(model): caches[1]}).logits
            want, _ = cached_forward(model, nxt, cache=caches[0])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_every_registered_method_has_a_contract_entry(bases):
    """A method registered in attnshare.methods but missing from METHODS would escape the contract."""
    from attnshare.methods import method_names

    model = bases("llama").fresh()
    covered = {p.method for entry in METHODS for p in entry.plans(model)}
    assert set(method_names()) <= covered, f"methods without a contract entry: {sorted(set(method_names()) - covered)}"
