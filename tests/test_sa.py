"""SA-specific tests: fused prefill, the receiver formula, bad plans and artifacts, healing, the real model.

Neutral plan, cache parity, beams, padding, exact savings, artifacts and unapply: tests/test_contract.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from helpers import greedy_generate, greedy_no_cache, logits, random_ids, teacher_kl

import attnshare
from attnshare.arch import geometry
from attnshare.errors import AttnshareError
from attnshare.memory import cache_bytes
from attnshare.methods.sa import SAPlan
from attnshare.methods.sa.plan import nearest_donors


def sa_plan(model, receivers=(2, 3), **kw) -> SAPlan:
    return SAPlan(donors=nearest_donors(list(receivers), geometry(model)), **kw)


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


@pytest.mark.parametrize(
    "donors, message",
    [
        ({2: 3}, "a donor must come before its receiver"),
        ({2: 1, 3: 2}, "Layer 2 is a receiver, so it cannot be the donor"),
        ({9: 1}, "layers 0..3"),
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

    kl_before = teacher_kl(model, teacher, ids)
    config = TrainConfig(seq_len=16, batch_size=4, max_steps=30, lr=3e-3, progress=False)
    train_shared(model, None, config, teacher=teacher, data=data)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".2.self_attn." in n or ".3.self_attn." in n for n in changed)
    assert teacher_kl(model, teacher, ids) < kl_before
    attnshare.save(model, tmp_path / "healed")
    loaded, _ = attnshare.load(tmp_path / "healed", model=tiny_model("llama"))
    assert torch.equal(logits(loaded, ids), logits(model, ids))
