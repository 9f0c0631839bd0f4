"""Model families: layouts found from modules (not listed), families a method refuses, and families the contract's
columns cannot hold.

The whole contract (tests/test_contract.py) runs on ``conftest.ARCH_NAMES``, which includes OLMo-2 (q/k norms over
the whole projection width) and Granite (no record in ``attnshare.arch``: found from its modules). Here:

- every record in ``attnshare.arch.RECORDS`` equals what derivation finds on the family's tiny model, and layouts
  that cannot be derived are refused in one sentence that names what is missing;
- ``FAMILIES``: per family outside the contract's columns, the contract entries that work on it (their contract
  properties run here, on the family's own attention implementation) and the sentence every other method refuses
  with, before it changes the model:

  ============  =========================================  =============================================
  family        works                                      refused (why)
  ============  =========================================  =============================================
  Phi-3         drop, layerdrop                            SA, LiSA, DirectShare, PostShare, mix, and
                                                           compositions with them (fused ``qkv_proj``)
  Gemma-2       every method (eager: no SDPA in HF)        none; soft-capped donors publish probabilities
  ============  =========================================  =============================================

Gemma-2 artifacts reload their base through ``attnshare.load_model``, which falls back to eager attention where
transformers offers no SDPA for a family (5.24 has none for Gemma-2; 5.17 has), so every property holds on it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import test_contract as contract
import torch
from conftest import ARCH_NAMES, OTHER_ARCHS, tiny_config, tiny_model
from helpers import logits, random_ids, tiny_tokenizer
from torch import nn

import attnshare
from attnshare import arch
from attnshare.errors import AttnshareError
from attnshare.methods.directshare import DirectShareConfig
from attnshare.methods.lisa import LiSAConfig, LiSAPlan
from attnshare.methods.mix import MixConfig
from attnshare.methods.postshare import PostShareConfig
from attnshare.methods.sa import SAConfig, SAPlan
from attnshare.methods.sa.plan import nearest_donors


def one_sentence(message: str) -> bool:
    return message.endswith(".") and ". " not in message and "\n" not in message


# ------------------------------------------------------------------------------------------------ derivation


def build(name: str, num_layers: int = 4, seed: int = 0) -> nn.Module:
    return tiny_model(name, num_layers, seed, attn_implementation=FAMILIES[name].attn if name in FAMILIES else "sdpa")


@pytest.mark.parametrize("name", ARCH_NAMES + OTHER_ARCHS)
def test_records_equal_what_derivation_finds(name):
    """A record is only what derivation finds on its family (it answers bare configs); Granite has none."""
    model = build(name)
    found = arch.derive(model)
    model_type = model.config.model_type
    if model_type in arch.RECORDS:
        assert found == arch.RECORDS[model_type] == arch.arch_of(model.config)
    else:
        with pytest.raises(AttnshareError, match="pass the model, not its config") as info:
            arch.arch_of(model.config)
        assert one_sentence(str(info.value))
    assert arch.arch_of(model) == found
    geo = arch.geometry(model)
    assert (geo.num_layers, geo.num_heads, geo.num_kv_heads) == (4, 4, 2)


def test_granite_is_found_without_a_record():
    assert "granite" not in arch.RECORDS
    spec = arch.arch_of(build("granite"))
    assert (spec.layers, spec.attn, spec.qkv, spec.o, spec.limits) == (
        "model.layers", "self_attn", ("q_proj", "k_proj", "v_proj"), "o_proj", ())


@pytest.mark.parametrize("name, scope", [("llama", None), ("qwen3", "head"), ("gemma3_text", "head"),
                                         ("olmo2", "projection")])
def test_qk_norm_scope_is_read_off_the_norm_widths(name, scope):
    spec = arch.arch_of(build(name))
    assert (spec.qk_norm, spec.qk_norm_scope) == (scope is not None, scope)


def test_fused_qkv_is_found_and_limits_the_family():
    spec = arch.arch_of(build("phi3"))
    assert spec.fused == "qkv_proj" and spec.qkv is None
    with pytest.raises(AttnshareError, match="no separate q, k and v projections: .*'qkv_proj'") as info:
        _ = spec.q
    assert one_sentence(str(info.value))
    assert spec.limit(arch.REPLACE_ATTENTION) and spec.limit(arch.PROJECTIONS)


def gpt2() -> nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config

    return AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, bos_token_id=1,
                                                       eos_token_id=2))


def with_sinks(model: nn.Module) -> nn.Module:
    """Every attention module gets an extra weight attnshare knows nothing about (like GPT-OSS's sinks)."""
    for layer in model.model.layers:
        layer.self_attn.sinks = nn.Parameter(torch.zeros(4))
    return model


def with_one_norm(model: nn.Module) -> nn.Module:
    for layer in model.model.layers:
        del layer.self_attn.k_norm
    return model


def with_odd_layer(model: nn.Module) -> nn.Module:
    """Layer 2 calls its output projection by another (known) name than the other layers do."""
    attn = model.model.layers[2].self_attn
    attn.out_proj = attn.o_proj
    del attn.o_proj
    return model


UNDERIVABLE = [
    pytest.param(gpt2, r"decoder layer 'transformer\.h\.0' \(GPT2Block: ln_1, attn, ln_2, mlp\) holds them",
                 id="gpt2-conv1d"),
    pytest.param(lambda: with_sinks(build("llama")), r"'model\.layers\.0\.self_attn' .*weights in 'sinks'",
                 id="unknown-weight"),
    pytest.param(lambda: with_one_norm(build("qwen3")), r"has a q_norm but no k_norm", id="one-norm"),
    pytest.param(lambda: with_odd_layer(build("llama")), r"'model\.layers\.2' is laid out differently",
                 id="odd-layer"),
]


@pytest.mark.parametrize("make, message", UNDERIVABLE)
def test_underivable_layouts_are_refused_in_one_sentence(make, message):
    with pytest.raises(AttnshareError, match=message) as info:
        arch.arch_of(make())
    assert one_sentence(str(info.value)) and "is not supported; supported types are: " in str(info.value)


def test_clip_qkv_limits_methods_that_recompute_v():
    """OLMo (v1) clamps q/k/v (clip_qkv): a receiver computing V as v_proj(x) would skip that, so SA is refused;
    drop never recomputes attention and works."""
    from transformers import AutoModelForCausalLM, OlmoConfig

    config = OlmoConfig(**{k: v for k, v in tiny_config("llama").to_diff_dict().items() if k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads")}, clip_qkv=8.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(AttnshareError, match=r"SA cannot run on this olmo model: .*clip_qkv") as info:
        attnshare.apply(model, SAPlan(donors={2: 1}))
    assert one_sentence(str(info.value))
    attnshare.apply(model, contract.DropPlan(layers=[1]))


# ------------------------------------------------------------------------------------------- family table


@dataclass(frozen=True)
class Family:
    """What the contract can say about one family outside its columns."""

    attn: str  # the attention implementation its base loads with
    works: frozenset[str]  # contract entries that work on it (the rest are refused)
    refusal: str = ""  # regex every refused entry's (one-sentence) error matches
    gaps: dict[str, str] = field(default_factory=dict)  # contract property -> why it fails for now (strict xfail)


ALL_ENTRIES = frozenset(entry.name for entry in contract.METHODS)
FAMILIES: dict[str, Family] = {
    "phi3": Family("sdpa", frozenset({"drop", "layerdrop"}), refusal=r"'qkv_proj', which attnshare does not split"),
    "gemma2": Family("eager", ALL_ENTRIES),
}
assert sorted(FAMILIES) == sorted(OTHER_ARCHS)


# contract property -> the contract suite's test of it, called as (entry, family, bases, tmp_path)
def on_cache(test: Callable, cache: str) -> Callable:
    return lambda entry, name, bases, _tmp: test(entry, name, cache, bases)


def plain(test: Callable) -> Callable:
    return lambda entry, name, bases, _tmp: test(entry, name, bases)


PROPERTIES: dict[str, Callable] = {
    "neutral": plain(contract.test_neutral_plan_is_the_base_exactly),
    **{f"greedy{suffix}": on_cache(contract.test_cached_greedy_generate_equals_no_cache_decoding, cache)
       for cache, suffix in (("dynamic", ""), ("static", "_static"))},
    **{f"beams{suffix}": on_cache(contract.test_cached_beam_search_equals_no_cache, cache)
       for cache, suffix in (("dynamic", ""), ("static", "_static"))},
    **{f"padding{suffix}": on_cache(contract.test_left_padded_batch_equals_each_prompt_alone, cache)
       for cache, suffix in (("dynamic", ""), ("static", "_static"))},
    "kv_bytes": plain(contract.test_kv_cache_bytes_exact),
    "kv_bytes_static": plain(contract.test_static_cache_bytes_exact),
    "parameters": plain(contract.test_parameter_count_exact),
    "save_load": lambda entry, name, bases, tmp: contract.test_save_load_reproduces_logits(entry, name, bases, tmp),
    "unapply": plain(contract.test_unapply_restores_the_base_exactly),
}


def property_case(entry, name: str, prop: str):
    gap = FAMILIES[name].gaps.get(prop)
    marks = [pytest.mark.xfail(strict=True, reason=gap)] if gap else []
    return pytest.param(entry, name, prop, id=f"{prop}[{entry.name}-{name}]", marks=marks)


WORKING = [property_case(entry, name, prop) for name, family in FAMILIES.items() for entry in contract.METHODS
           if entry.name in family.works for prop in PROPERTIES]
REFUSED = [pytest.param(entry, name, id=f"{entry.name}-{name}") for name, family in FAMILIES.items()
           for entry in contract.METHODS if entry.name not in family.works]


@pytest.fixture(scope="module")
def family_bases(tmp_path_factory) -> Callable[[str], contract.Base]:
    """As the contract's ``bases``, each base loaded with its family's attention implementation."""
    made: dict[str, contract.Base] = {}

    def get(name: str) -> contract.Base:
        if name not in made:
            folder = tmp_path_factory.mktemp(f"base-{name}")  # as conftest.tiny_checkpoint, built with its attention
            build(name).save_pretrained(folder)
            tiny_tokenizer().save_pretrained(folder)
            model, _ = attnshare.load_model(str(folder), attn_implementation=FAMILIES[name].attn)
            made[name] = contract.Base(folder, model, contract.Dims.of(model), logits(model, contract.IDS))
        return made[name]

    return get


@pytest.mark.parametrize("entry, name, prop", WORKING)
def test_contract_property_on_family(entry, name, prop, family_bases, tmp_path):
    PROPERTIES[prop](entry, name, family_bases, tmp_path)


@pytest.mark.parametrize("entry, name", REFUSED)
def test_refused_entry_says_why_before_changing_the_model(entry, name, family_bases):
    """Planning or applying refuses in one sentence; a refused first plan leaves the model as it was."""
    base = family_bases(name)
    model = base.fresh()
    with pytest.raises(AttnshareError, match=FAMILIES[name].refusal) as info:
        attnshare.apply(model, entry.plans(model))
    assert one_sentence(str(info.value)), str(info.value)
    if entry.name != "drop+sa":  # a composition's earlier plans are applied before a later plan is refused
        state = model.state_dict()
        assert sorted(state) == sorted(base.model.state_dict())
        assert all(torch.equal(state[k], v) for k, v in base.model.state_dict().items())
        assert torch.equal(logits(model, contract.IDS), base.logits)


@pytest.mark.parametrize("entry", [e for e in contract.METHODS if e.name in FAMILIES["gemma2"].works], ids=repr)
def test_gemma2_unapply_keeping_originals(entry, family_bases):
    """The contract's unapply property where it needs no reload: originals kept, eager attention back."""
    base = family_bases("gemma2")
    model, _ = contract.shared(entry, base, keep_originals=True)
    logits(model, contract.IDS)
    attnshare.unapply(model)
    assert torch.equal(logits(model, contract.IDS), base.logits)
    state = model.state_dict()
    assert sorted(state) == sorted(base.model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in base.model.state_dict().items())
    assert model.config._attn_implementation == "eager" and not hasattr(model, "attnshare_state")


PLANNERS = [
    pytest.param("sa", SAConfig(receivers=[2]), id="sa"),
    pytest.param("lisa", LiSAConfig(layers=[2]), id="lisa"),
    pytest.param("directshare", DirectShareConfig(ratio=0.5), id="directshare"),
    pytest.param("postshare", PostShareConfig(ratio=0.5), id="postshare"),
    pytest.param("mix", MixConfig(kv_saving=0.2), id="mix"),
]


@pytest.mark.parametrize("method, config", PLANNERS)
def test_planners_refuse_phi3_before_measuring(method, config, family_bases):
    model = family_bases("phi3").fresh()
    with pytest.raises(AttnshareError, match=FAMILIES["phi3"].refusal) as info:
        attnshare.get_method(method).make_plan(model, config)
    assert one_sentence(str(info.value))


# ------------------------------------------------------------------------------------ Gemma-2 soft-capping


def gemma2(layer_types: str | None = None, num_layers: int = 4) -> nn.Module:
    """The tiny Gemma-2 under eager attention; ``layer_types`` makes every layer one kind."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("gemma2", num_layers)
    if layer_types:
        config.layer_types = [layer_types] * num_layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()


def test_sa_receivers_use_the_donors_soft_capped_probabilities():
    """Receiver r's attention output == o_proj(P_donor V_r) with P_donor the base's soft-capped probabilities
    (prefill, fused or not; the cap visibly changes P on this model)."""
    base = gemma2()
    ids = random_ids(2, 12)
    with torch.no_grad():
        probs = base(ids, output_attentions=True, use_cache=False).attentions  # (B,H,T,T) per layer, capped
    donors = nearest_donors([2, 3], arch.geometry(base))
    uncapped = copy.deepcopy(base)
    uncapped.config.attn_logit_softcapping = None
    for layer in uncapped.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    with torch.no_grad():
        plain = uncapped(ids, output_attentions=True, use_cache=False).attentions
    assert not torch.allclose(plain[donors[2]], probs[donors[2]], atol=1e-3)  # the cap matters here
    for fused in (True, False):
        model = attnshare.apply(copy.deepcopy(base), SAPlan(donors=donors, fused_prefill=fused))
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = [arch.attention(model, r).register_forward_hook(
            lambda m, args, kwargs, out, r=r, seen=seen: seen.__setitem__(r, (kwargs["hidden_states"], out[0])),
            with_kwargs=True) for r in donors]
        logits(model, ids)
        for hook in hooks:
            hook.remove()
        for receiver, donor in donors.items():
            hidden, out = seen[receiver]
            attn = arch.attention(model, receiver)
            v = attn.v_proj(hidden).view(2, 12, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)  # (B,H,T,d)
            want = attn.o_proj((probs[donor] @ v).transpose(1, 2).reshape(2, 12, 64))
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source", ["scores", "probs"])
def test_lisa_step0_reads_the_soft_capped_donor(source):
    """LiSA at init == aligned SA (whose receivers read the capped probabilities, above), so LiSA's Z honours the
    cap; on layers of one window kind, as in test_lisa. The LiSA layer's own sum S_l is not capped again."""
    maps = {2: [2, 3, 0, 1], 3: [3, 2, 1, 0]}
    ids = random_ids(2, 20)
    for fused in (True, False):
        lisa = attnshare.apply(gemma2(layer_types="full_attention"),
                               LiSAPlan(layers=[2, 3], head_map=maps, rank=4, source=source, fused_prefill=fused))
        composed = [maps[2][maps[3][h]] for h in range(4)]
        sa = attnshare.apply(gemma2(layer_types="full_attention"),
                             SAPlan(donors={2: 1, 3: 1}, head_map={2: maps[2], 3: composed}, fused_prefill=fused))
        got, want = logits(lisa, ids), logits(sa, ids)
        if source == "scores":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
