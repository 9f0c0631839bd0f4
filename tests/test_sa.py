"""SA: parity with the base model, cache/no-cache equality, real savings, artifact round trip, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from helpers import greedy_generate, greedy_no_cache, logits, random_ids

import attnshare
from attnshare.arch import geometry
from attnshare.bench.memory import cache_bytes
from attnshare.errors import AttnshareError
from attnshare.methods.sa import SAPlan
from attnshare.methods.sa.plan import nearest_donors


def sa_plan(model, receivers=(2, 3), **kw) -> SAPlan:
    return SAPlan(donors=nearest_donors(list(receivers), geometry(model)), **kw)


def test_empty_plan_is_bit_exact(arch):
    model = tiny_model(arch)
    ids = random_ids(2, 24)
    ref = logits(model, ids)
    attnshare.apply(model, SAPlan())
    assert torch.equal(logits(model, ids), ref)


def test_fused_prefill_equals_materialised_probabilities(arch):
    ids = random_ids(2, 24)
    fused = attnshare.apply(tiny_model(arch), sa_plan(tiny_model(arch)))
    probs = attnshare.apply(tiny_model(arch), sa_plan(tiny_model(arch), fused_prefill=False))
    torch.testing.assert_close(logits(fused, ids), logits(probs, ids), rtol=1e-4, atol=1e-5)


def test_receiver_equals_donor_probabilities_times_own_v(arch):
    """Reference check: the receiver's attention output is P_donor @ V_receiver computed by hand."""
    from attnshare.attention.functional import repeat_kv

    model = tiny_model(arch, attn_implementation="eager")
    base = tiny_model(arch, attn_implementation="eager")
    plan = sa_plan(model, (3,))  # only layer 3 shares, so its input equals the base model's
    receiver, donor = 3, plan.donors[3]
    captured = {}
    hooks = [
        base.model.layers[donor].self_attn.register_forward_hook(lambda m, a, o: captured.__setitem__("p", o[1])),
        base.model.layers[receiver].self_attn.register_forward_pre_hook(
            lambda m, a, kw: captured.__setitem__("x", kw["hidden_states"]), with_kwargs=True
        ),
    ]
    ids = random_ids(1, 12)
    with torch.no_grad():
        base(ids, use_cache=False, output_attentions=True)
    for h in hooks:
        h.remove()
    attn = base.model.layers[receiver].self_attn
    b, t, _ = captured["x"].shape
    v = attn.v_proj(captured["x"]).view(b, t, -1, attn.head_dim).transpose(1, 2)
    expected = attn.o_proj((captured["p"] @ repeat_kv(v, attn.num_key_value_groups)).transpose(1, 2).reshape(b, t, -1))
    attnshare.apply(model, plan)
    got = {}
    model.model.layers[receiver].self_attn.register_forward_hook(lambda m, a, o: got.__setitem__("o", o[0]))
    with torch.no_grad():
        model(ids, use_cache=False)
    torch.testing.assert_close(got["o"], expected, rtol=1e-4, atol=1e-5)


def test_generate_with_cache_equals_no_cache_decoding(arch):
    model = attnshare.apply(tiny_model(arch, num_layers=6), sa_plan(tiny_model(arch, num_layers=6), (2, 3, 5)))
    ids = random_ids(2, 10, seed=1)
    assert torch.equal(greedy_generate(model, ids, 32), greedy_no_cache(model, ids, 32))


def test_beam_search_with_cache_equals_no_cache(arch):
    """Beam search reorders every layer's cache; receivers' caches hold V only (zero-width K) and must follow."""
    model = attnshare.apply(tiny_model(arch), sa_plan(tiny_model(arch), (2, 3)))
    ids = random_ids(2, 7, seed=3)
    kw = {"attention_mask": torch.ones_like(ids), "num_beams": 3, "max_new_tokens": 6, "do_sample": False,
          "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), model.generate(ids, **kw, use_cache=False))


def test_aligned_heads_generate_with_cache_equals_no_cache(arch):
    base = tiny_model(arch)
    plan = sa_plan(base, (2, 3))
    plan.head_map = {r: [3, 2, 1, 0] for r in plan.donors}
    model = attnshare.apply(base, plan)
    ids = random_ids(1, 8, seed=2)
    assert torch.equal(greedy_generate(model, ids, 32), greedy_no_cache(model, ids, 32))


def test_kv_cache_bytes_drop_exactly(arch):
    ids = random_ids(2, 20)
    base = tiny_model(arch, num_layers=6)
    with torch.no_grad():
        base_bytes = cache_bytes(base(ids, use_cache=True).past_key_values)
    receivers = (2, 3, 5)
    model = attnshare.apply(tiny_model(arch, num_layers=6), sa_plan(base, receivers))
    with torch.no_grad():
        shared_bytes = cache_bytes(model(ids, use_cache=True).past_key_values)
    if arch == "gemma3_text":  # sliding layers cache fewer tokens: count the removed K tensors exactly
        geo = geometry(model)
        per_token = 2 * geo.num_kv_heads * geo.head_dim * 4  # K bytes per token per batch row
        kept = {l: min(20, 7) if geo.layer_types[l] == "sliding_attention" else 20 for l in receivers}
        assert base_bytes - shared_bytes == sum(kept[l] * per_token for l in receivers)
    else:
        assert shared_bytes * 2 * 6 == base_bytes * (2 * 6 - len(receivers))


def test_parameters_really_removed(arch):
    base = tiny_model(arch)
    before = base.num_parameters()
    geo = geometry(base)
    attn = base.model.layers[2].self_attn
    per_layer = sum(p.numel() for n in ("q_proj", "k_proj", "q_norm", "k_norm") if hasattr(attn, n)
                    for p in getattr(attn, n).parameters())
    model = attnshare.apply(base, sa_plan(base, (2, 3)))
    assert model.num_parameters() == before - 2 * per_layer
    assert not any(".2.self_attn.q_proj" in n or ".3.self_attn.k_proj" in n for n, _ in model.named_parameters())
    assert per_layer >= geo.hidden_size * (geo.num_heads + geo.num_kv_heads) * geo.head_dim


def test_save_load_reproduces_logits(arch, tmp_path):
    base = tiny_model(arch)
    model = attnshare.apply(base, sa_plan(base))
    ids = random_ids(2, 16)
    ref = logits(model, ids)
    attnshare.save(model, tmp_path / "art")
    fresh = tiny_model(arch)
    loaded, _ = attnshare.load(tmp_path / "art", model=fresh)
    assert torch.equal(logits(loaded, ids), ref)
    assert attnshare.applied_plans(loaded)[0].donors == model.attnshare_state.applied[0].plan.donors


def test_unapply_restores_base_exactly(arch):
    ref_model = tiny_model(arch)
    ids = random_ids(1, 16)
    ref = logits(ref_model, ids)
    model = attnshare.apply(tiny_model(arch), sa_plan(ref_model), keep_originals=True)
    attnshare.unapply(model)
    assert torch.equal(logits(model, ids), ref)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref_model.state_dict().items()}
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "donors, message",
    [
        ({2: 3}, "a donor must come before its receiver"),
        ({2: 1, 3: 2}, "Layer 2 is a receiver, so it cannot be the donor"),
        ({9: 1}, "model has layers 0..3"),
    ],
)
def test_bad_plans_are_refused_before_any_change(donors, message):
    model = tiny_model("llama")
    with pytest.raises(AttnshareError, match=message):
        attnshare.apply(model, SAPlan(donors=donors))
    assert not hasattr(model, "attnshare_state") and model.config._attn_implementation == "sdpa"


def test_mismatched_window_kinds_are_refused():
    model = tiny_model("gemma3_text")  # layer 0 sliding, layer 1 full
    with pytest.raises(AttnshareError, match="same window kind"):
        attnshare.apply(model, SAPlan(donors={1: 0}))


def test_artifact_for_another_base_and_corrupt_files_are_refused(tmp_path):
    model = attnshare.apply(tiny_model("llama", seed=0), SAPlan(donors={2: 1}))
    attnshare.save(model, tmp_path / "art")
    with pytest.raises(AttnshareError, match="was made for base model"):
        attnshare.load(tmp_path / "art", model=tiny_model("llama", seed=1))
    (tmp_path / "art" / "attnshare.json").write_text("{not json")
    with pytest.raises(AttnshareError, match="is corrupt"):
        attnshare.load(tmp_path / "art", model=tiny_model("llama"))
    with pytest.raises(AttnshareError, match="not an attnshare artifact"):
        attnshare.load(tmp_path / "nothing", model=tiny_model("llama"))


def test_plan_json_round_trip(tmp_path):
    plan = SAPlan(donors={5: 4, 6: 4}, head_map={5: [1, 0, 2, 3]})
    attnshare.save_plans(plan, tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["method"] == "sa"
    assert attnshare.load_plans(tmp_path / "p.json") == [plan]


@pytest.mark.real
def test_real_model_span_generates_identically_with_and_without_cache(real_model):
    import copy

    model, tok = real_model
    shared = attnshare.apply(copy.deepcopy(model), SAPlan(donors={23: 22, 24: 22, 25: 22, 26: 22}))
    ids = tok("The plays of Shakespeare were first collected", return_tensors="pt").input_ids
    assert torch.equal(greedy_generate(shared, ids, 12), greedy_no_cache(shared, ids, 12))
    with torch.no_grad():
        base_kv = cache_bytes(model(ids, use_cache=True).past_key_values)
        shared_kv = cache_bytes(shared(ids, use_cache=True).past_key_values)
    assert shared_kv * 60 == base_kv * (60 - 4)  # 4 receivers of 30 layers drop 4/(2*30) of the KV cache


def test_healing_trains_only_receivers_and_the_artifact_keeps_them(tmp_path):
    from attnshare.training import TrainConfig, train_shared

    teacher = tiny_model("llama", seed=1)  # a different model, so there is a real gap to distil
    model = attnshare.apply(tiny_model("llama"), SAPlan(donors={2: 1, 3: 1}))
    before = {n: p.clone() for n, p in model.named_parameters()}
    data = random_ids(1, 16 * 8, seed=3).view(-1)
    ids = data.view(8, 16)

    def kl() -> float:
        s, t = logits(model, ids).log_softmax(-1), logits(teacher, ids).log_softmax(-1)
        return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean").item()

    kl_before = kl()
    config = TrainConfig(seq_len=16, batch_size=4, max_steps=30, lr=3e-3, progress=False)
    train_shared(model, None, config, teacher=teacher, data=data)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".2.self_attn." in n or ".3.self_attn." in n for n in changed)
    assert kl() < kl_before
    attnshare.save(model, tmp_path / "healed")
    loaded, _ = attnshare.load(tmp_path / "healed", model=tiny_model("llama"))
    assert torch.equal(logits(loaded, ids), logits(model, ids))
