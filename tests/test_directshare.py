"""DirectShare: weight similarity, planning and chains, stored-once sharing, bad input, CLI, the real model.

Neutral plan, cache parity, beams, padding, exact savings, artifacts, unapply and composition with SA:
tests/test_contract.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from conftest import tiny_model

import attnshare
from attnshare.analysis.weights import MATCH_FUNCTIONS, unit_similarity, unit_vectors, units
from attnshare.arch import attention, geometry
from attnshare.errors import AttnshareError
from attnshare.methods import get_method
from attnshare.methods.directshare import DirectShareConfig, DirectSharePlan
from attnshare.methods.directshare.planner import WeightMatches, best_matches, match_statistics

# ------------------------------------------------------------------------------------------ weight similarity


def plant_copy(model, dst: tuple[int, int], src: tuple[int, int], parts=("q", "k", "v")) -> None:
    """Make unit ``dst`` (layer, unit) an exact copy of unit ``src`` in the given projections."""
    geo = geometry(model)
    g, d = geo.group_size, geo.head_dim
    rows = {"q": g * d, "k": d, "v": d}
    with torch.no_grad():
        for p in parts:
            dst_w = getattr(attention(model, dst[0]), f"{p}_proj").weight
            src_w = getattr(attention(model, src[0]), f"{p}_proj").weight
            r = rows[p]
            dst_w[dst[1] * r : (dst[1] + 1) * r] = src_w[src[1] * r : (src[1] + 1) * r]


def test_units_and_kinds():
    geo = geometry(tiny_model("llama"))
    assert units(geo) == 2 and geo.group_size == 2
    assert best_matches(tiny_model("llama")).unit_kind == "kv_group"
    from transformers import AutoModelForCausalLM, LlamaConfig

    mha = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4))
    assert units(geometry(mha)) == 4 and best_matches(mha).unit_kind == "head"


def test_match_functions_slice_the_right_weights(arch):
    model = tiny_model(arch)
    geo = geometry(model)
    g, d = geo.group_size, geo.head_dim
    attn = attention(model, 2)
    u = 1
    q = attn.q_proj.weight[u * g * d : (u + 1) * g * d]
    k = attn.k_proj.weight[u * d : (u + 1) * d]
    v = attn.v_proj.weight[u * d : (u + 1) * d]
    o = attn.o_proj.weight[:, u * g * d : (u + 1) * g * d]
    expected = {"q": q, "k": k, "v": v, "qk": torch.cat([q, k]), "qkv": torch.cat([q, k, v]), "o": o}
    assert set(MATCH_FUNCTIONS) == set(expected)
    for name, ref in expected.items():
        got = unit_vectors(model, 2, name)
        assert got.shape == (units(geo), ref.numel())
        assert torch.equal(got[u], ref.flatten().float()), name


def test_unit_similarity_is_cosine():
    model = tiny_model("qwen2")
    sim = unit_similarity(model, 1, 1)
    torch.testing.assert_close(sim.diagonal(), torch.ones(2))
    a, b = unit_vectors(model, 1, "qk"), unit_vectors(model, 3, "qk")
    ref = torch.nn.functional.cosine_similarity(a[0], b[1], dim=0)
    torch.testing.assert_close(unit_similarity(model, 1, 3)[0, 1], ref)


def test_best_matches_find_a_planted_copy(arch):
    model = tiny_model(arch)
    plant_copy(model, (3, 1), (1, 0))
    m = best_matches(model, "qk")
    assert m.score.shape == (4, 2) and m.layer.dtype == torch.long
    assert torch.isnan(m.score[0]).all() and (m.layer[0] == -1).all() and (m.unit[0] == -1).all()
    assert math.isclose(float(m.score[3, 1]), 1.0, rel_tol=1e-5)
    assert (int(m.layer[3, 1]), int(m.unit[3, 1])) == (1, 0)
    has = m.layer[1:] >= 0  # every unit with an earlier layer of its kind has a match, always an earlier layer
    assert (m.layer[1:][has] < torch.arange(1, 4).unsqueeze(1).expand(-1, 2)[has]).all()
    kinds = geometry(model).layer_types
    matched = [l for l in range(1, 4) if any(kinds[e] == kinds[l] for e in range(l))]
    assert has.any(dim=1).tolist() == [l in matched for l in range(1, 4)]
    stats = match_statistics(m)
    assert stats["max"] == pytest.approx(1.0, rel=1e-5) and stats["units"] == 2 * len(matched)
    back = WeightMatches.from_dict(json.loads(json.dumps(m.to_dict())))
    assert torch.equal(back.layer, m.layer) and torch.equal(back.unit, m.unit)
    torch.testing.assert_close(back.score, m.score, equal_nan=True)


def test_unknown_match_function_is_refused():
    with pytest.raises(AttnshareError, match="Unknown match function 'qq'"):
        best_matches(tiny_model("llama"), "qq")


def test_similarity_needs_the_projections():
    from attnshare.methods.sa import SAPlan

    model = attnshare.apply(tiny_model("llama"), SAPlan(donors={2: 1}))
    with pytest.raises(AttnshareError, match="Layer 2 has no q_proj weights"):
        best_matches(model, "qk")
    assert best_matches(model, "v").layer.shape == (4, 2)  # v is still there


# ----------------------------------------------------------------------------------------- planning and chains


def ds_plan(model, ratio=0.5, match="qk", share_o=False, select="cosine", norms="own"):
    """A planned DirectShare plan; the layers keep their own q/k norms unless asked (the slices are under test
    here; travelling norms have tests of their own)."""
    from attnshare.methods import get_method
    from attnshare.methods.directshare import DirectShareConfig

    return get_method("directshare").make_plan(model, DirectShareConfig(ratio=ratio, match=match, share_o=share_o,
                                                                        select=select, norms=norms))


def hand_matches(score, layer, unit) -> WeightMatches:
    return WeightMatches(torch.tensor(score, dtype=torch.float32), torch.tensor(layer), torch.tensor(unit), "qk",
                         "kv_group")


def test_select_pairs_ranks_and_resolves_chains_to_roots():
    from attnshare.methods.directshare import select_pairs

    nan = float("nan")
    # chain (3,0) -> (2,1) -> (1,0) -> (0,1); (3,1) -> (2,0) which stays unreplaced
    matches = hand_matches(
        [[nan, nan], [0.9, 0.1], [0.2, 0.8], [0.7, 0.5]],
        [[-1, -1], [0, 0], [0, 1], [2, 2]],
        [[-1, -1], [1, 0], [0, 0], [1, 0]],
    )
    assert select_pairs(matches, 0.0) == []
    assert select_pairs(matches, 0.125) == [(1, 0, 0, 1)]  # N = floor(0.125 * 8) = 1: the top score
    # N = 4: (1,0) .9, (2,1) .8, (3,0) .7, (3,1) .5 replaced; (3,0)'s chain ends at (0,1), (3,1) -> (2,0) is a root
    assert select_pairs(matches, 0.5) == [(1, 0, 0, 1), (2, 1, 0, 1), (3, 0, 0, 1), (3, 1, 2, 0)]
    # ties rank by (layer, unit), so equal scores never depend on iteration order
    tied = hand_matches([[nan, nan], [0.5, 0.5], [0.5, 0.5]], [[-1, -1], [0, 0], [0, 0]], [[-1, -1], [0, 0], [0, 0]])
    assert select_pairs(tied, 0.34) == [(1, 0, 0, 0), (1, 1, 0, 0)]


def test_planted_chain_on_real_weights(arch):
    """(c,0) copies (b,1) which nearly copies (a,0), three layers of one kind: both are replaced and both end up
    sharing (a,0)'s weights (on alternating sliding / full models the chain runs over layers 0, 2, 4)."""
    model = tiny_model(arch, num_layers=6)
    kinds = geometry(model).layer_types
    a, b, c = [layer for layer in range(6) if kinds[layer] == kinds[0]][:3]
    plant_copy(model, (b, 1), (a, 0))
    with torch.no_grad():  # make (b,1) a near copy so (c,0)'s best match is (b,1), not (a,0)
        for p in ("q", "k", "v"):
            w = getattr(attention(model, b), f"{p}_proj").weight
            rows = w.shape[0] // 2
            w[rows:] += 0.01 * torch.randn_like(w[rows:])
    plant_copy(model, (c, 0), (b, 1))
    m = best_matches(model)
    assert (int(m.layer[c, 0]), int(m.unit[c, 0])) == (b, 1) and (int(m.layer[b, 1]), int(m.unit[b, 1])) == (a, 0)
    plan = ds_plan(model, ratio=2 / 12)  # N = 2: the two planted units
    assert plan.pairs == [(b, 1, a, 0), (c, 0, a, 0)]
    assert plan.layers == [a, b, c]


# ------------------------------------------------------------------------------------- the measured planner

SMALL_LOSS = {"loss_tokens": 64}  # tiny held-out budget: the tests take seconds


def test_loss_planner_pure_parts():
    from attnshare.methods.directshare.loss_planner import assign_donors, cosine_order, lowest, relative_change

    assert lowest({(1, 0): 0.2, (1, 1): 0.1, (2, 0): 0.1}) == [(1, 1), (2, 0), (1, 0)]  # ties to the lower unit
    assert lowest({(1, 0): 0.2, (1, 1): 0.1}, 1) == [(1, 1)]
    # (2,0)'s best donor (1,1) is replaced too, so it takes its next one; chains never appear
    order = {(1, 1): [(0, 0), (0, 1)], (2, 0): [(1, 1), (1, 0), (0, 0), (0, 1)]}
    assert assign_donors([(2, 0), (1, 1)], order) == [(1, 1, 0, 0), (2, 0, 1, 0)]
    base = torch.ones(1, 2, 3)
    assert relative_change(base, base) == 0.0 and relative_change(2 * base, base) == pytest.approx(1.0)
    vectors = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.1, 1.0], [1.0, 0.0]]])  # (L=2, U=2, n=2)
    assert cosine_order(vectors) == {(1, 0): [(0, 1), (0, 0)], (1, 1): [(0, 0), (0, 1)]}


def test_unit_replaced_writes_the_donor_and_restores_exactly(arch):
    from attnshare.arch import arch_of
    from attnshare.methods.directshare.loss_planner import unit_tensors, units_replaced

    model = tiny_model(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec, kinds = arch_of(model), ("q", "k", "v", "o")
    with units_replaced(model, {(3, 1): (1, 0)}, kinds, spec):
        for got, want in zip(unit_tensors(model, (3, 1), kinds, spec), unit_tensors(model, (1, 0), kinds, spec)):
            assert torch.equal(got, want)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def loaded_tiny(tmp_path, arch="llama", num_layers=4):
    from conftest import tiny_checkpoint

    model, tok = attnshare.load_model(str(tiny_checkpoint(tmp_path / arch, arch, num_layers)))
    return model, tok


@pytest.mark.parametrize("ratio, count", [(0.125, 1), (0.25, 2), (0.5, 4), (0.75, 6)])
def test_loss_planner_returns_a_valid_plan_of_the_requested_size(tmp_path, ratio, count):
    from helpers import logits, random_ids

    from attnshare.methods import get_method
    from attnshare.methods.directshare import DirectShareConfig

    model, _ = loaded_tiny(tmp_path)
    ids = random_ids(1, 12)
    ref = logits(model, ids)
    plan = get_method("directshare").make_plan(model, DirectShareConfig(ratio=ratio, **SMALL_LOSS))
    assert plan.select == "loss" and len(plan.pairs) == count  # N = floor(ratio * 4 layers * 2 units)
    plan.validate(geometry(model))  # earlier roots, none of them replaced (no chains), no unit twice
    assert all(layer >= 1 for layer, *_ in plan.pairs)
    assert torch.equal(logits(model, ids), ref)  # planning leaves the model as it was
    assert attnshare.api.applied_plans(model) == []
    attnshare.apply(model, plan)
    assert torch.isfinite(logits(model, ids)).all()


def test_loss_planner_finds_a_planted_copy(tmp_path):
    """A unit that is an exact copy of an earlier one costs nothing to share: the loss rule picks it and its source."""
    from attnshare.methods import get_method
    from attnshare.methods.directshare import DirectShareConfig

    model, _ = loaded_tiny(tmp_path)
    plant_copy(model, (3, 1), (1, 0))
    plan = get_method("directshare").make_plan(model, DirectShareConfig(ratio=0.125, **SMALL_LOSS))
    assert plan.pairs == [(3, 1, 1, 0)]


def test_loss_plans_for_several_ratios_share_one_measurement(tmp_path, monkeypatch):
    from attnshare.methods import get_method
    from attnshare.methods.directshare import DirectShareConfig, loss_planner

    model, _ = loaded_tiny(tmp_path)
    runs = []
    original = loss_planner.UnitCosts

    def counted(*args, **kwargs):
        runs.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(loss_planner, "UnitCosts", counted)
    method = get_method("directshare")
    configs = [DirectShareConfig(ratio=r, **SMALL_LOSS) for r in (0.0, 0.25, 0.5)]
    plans = method.make_plans(model, configs)
    assert len(runs) == 1 and [len(p.pairs) for p in plans] == [0, 2, 4]
    assert [p.pairs for p in plans] == [method.make_plan(model, c).pairs for c in configs]
    greedy = method.make_plan(model, DirectShareConfig(ratio=0.5, greedy=2, **SMALL_LOSS))
    assert len(greedy.pairs) == 4
    greedy.validate(geometry(model))


def test_cosine_option_gives_the_papers_plan(arch):
    from attnshare.methods.directshare import DirectShareConfig, select_pairs

    model = tiny_model(arch, num_layers=6)
    for ratio in (0.25, 0.5):
        plan = ds_plan(model, ratio=ratio, select="cosine")
        assert plan.pairs == select_pairs(best_matches(model, "qk"), ratio) and plan.select == "cosine"
    assert DirectShareConfig().select == "loss"


def test_split_units_fill_the_parameter_budget_with_query_and_kv_heads(tmp_path):
    """granularity="split": query heads (W_q) and KV heads (W_k/W_v) are units of their own; a plan frees exactly
    the ratio's share of the q/k/v parameters; its summary says what each kind reached; it round-trips."""
    from attnshare.methods import get_method
    from attnshare.methods.directshare import DirectShareConfig, DirectSharePlan
    from attnshare.methods.directshare.plan import KV, QUERY, part_parameters

    model, _ = loaded_tiny(tmp_path)  # 4 layers, H=4, Hkv=2, d=16, D=64
    geo = geometry(model)
    q_size, kv_size = part_parameters(model, QUERY), part_parameters(model, KV)
    assert (q_size, kv_size) == (16 * 64, 2 * 16 * 64)
    for ratio in (0.25, 0.5):
        plan = get_method("directshare").make_plan(model, DirectShareConfig(ratio=ratio, granularity="split",
                                                                            **SMALL_LOSS))
        plan.validate(geo)
        budget = int(ratio * 4 * (4 * q_size + 2 * kv_size))  # the ratio of all q/k/v parameters
        saved = model.num_parameters() - attnshare.apply(copy.deepcopy(model), plan).num_parameters()
        assert saved == len(plan.q_pairs) * q_size + len(plan.pairs) * kv_size == budget == plan.reached["params"]
        assert all(0 <= u < 4 for _, u, _, _ in plan.q_pairs) and all(0 <= u < 2 for _, u, _, _ in plan.pairs)
        assert f"{len(plan.pairs)} KV heads + {len(plan.q_pairs)} query heads share" in plan.summary()
        assert f"{budget:,} parameters = {ratio:.1%} of q/k/v (asked {ratio:.1%})" in plan.summary()
        assert DirectSharePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    group = get_method("directshare").make_plan(model, DirectShareConfig(ratio=0.25, **SMALL_LOSS))
    assert "granularity" not in group.to_dict() and group.q_pairs == []  # KV-group plans read as before


def test_split_units_reuse_a_planted_query_head(tmp_path):
    """One query head made an exact copy of an earlier one costs nothing: the split planner shares exactly it."""
    from attnshare.methods import get_method
    from attnshare.methods.directshare import DirectShareConfig

    model, _ = loaded_tiny(tmp_path)
    d = geometry(model).head_dim
    with torch.no_grad():
        for layer in range(4):  # sharper attention, so that which query head a layer reads matters at random init
            attention(model, layer).q_proj.weight.mul_(8.0)
        q = {layer: attention(model, layer).q_proj.weight for layer in (1, 3)}
        q[3][2 * d:3 * d] = q[1][0:d]  # query head 2 of layer 3 := query head 0 of layer 1
    plan = get_method("directshare").make_plan(model, DirectShareConfig(ratio=1 / 32, granularity="split",
                                                                        **SMALL_LOSS))
    assert plan.q_pairs == [(3, 2, 1, 0)] and plan.pairs == []


@pytest.mark.parametrize("kw, message", [
    ({"select": "best"}, "--select must be one of loss, cosine"),
    ({"loss_tokens": 1}, "--loss-tokens must be a whole number of at least 2"),
    ({"greedy": -1}, "--donor-pool and --greedy must be zero or positive"),
    ({"calib_text": "britannica"}, "'britannica' is an evaluation text"),
    ({"granularity": "head"}, "--granularity must be group or split"),
    ({"granularity": "split", "select": "cosine"}, "--granularity split needs --select loss"),
    ({"granularity": "split", "greedy": 2}, "--greedy confirms KV-group units"),
])
def test_bad_loss_planner_settings_are_one_sentence(kw, message):
    from attnshare.methods.directshare import DirectShareConfig

    with pytest.raises(AttnshareError, match=message):
        DirectShareConfig(**kw)


# ------------------------------------------------------------------------------------- parity and real savings


def unit_params(model, share_o: bool) -> int:
    """Parameters of one unit: its q/k/v rows (and biases), plus its o_proj columns with share_o."""
    geo = geometry(model)
    attn = attention(model, 0)
    r_q, r_kv = geo.group_size * geo.head_dim, geo.head_dim
    n = (r_q + 2 * r_kv) * geo.hidden_size
    n += (r_q + 2 * r_kv) if attn.q_proj.bias is not None else 0
    return n + (geo.hidden_size * r_q if share_o else 0)


def shared_reference(model, plan):
    """The base model with each replaced unit's slices overwritten by its root's (what sharing must compute)."""
    import copy

    ref = copy.deepcopy(model)
    for layer, unit, root_layer, root_unit in plan.pairs:
        plant_copy(ref, (layer, unit), (root_layer, root_unit))
        geo = geometry(ref)
        r = geo.group_size * geo.head_dim
        with torch.no_grad():
            for p, rows in (("q", r), ("k", geo.head_dim), ("v", geo.head_dim)):
                b_dst = getattr(attention(ref, layer), f"{p}_proj").bias
                if b_dst is not None:
                    b_src = getattr(attention(ref, root_layer), f"{p}_proj").bias
                    b_dst[unit * rows : (unit + 1) * rows] = b_src[root_unit * rows : (root_unit + 1) * rows]
            if plan.share_o:
                o_dst, o_src = attention(ref, layer).o_proj.weight, attention(ref, root_layer).o_proj.weight
                o_dst[:, unit * r : (unit + 1) * r] = o_src[:, root_unit * r : (root_unit + 1) * r]
    return ref


@pytest.mark.parametrize("share_o", [False, True])
def test_shared_units_are_stored_once_and_compute_the_copied_model(arch, share_o):
    from helpers import logits, random_ids

    from attnshare.methods.directshare import BANK, GatheredLinear

    model = tiny_model(arch, num_layers=6)
    plan = ds_plan(model, ratio=0.4, share_o=share_o)  # N = floor(0.4 * 6 * 2) = 4
    assert len(plan.pairs) == 4
    ref = shared_reference(model, plan)
    params, unit = model.num_parameters(), unit_params(model, share_o)
    ids = random_ids(2, 20)
    attnshare.apply(model, plan)
    assert model.num_parameters() == params - 4 * unit  # exactly the replaced units' parameters are gone
    tensors = list(model.parameters())
    assert not any(p.is_meta for p in tensors)
    storage = sum(p.untyped_storage().nbytes() for p in {p.untyped_storage().data_ptr(): p for p in tensors}.values())
    assert storage == (params - 4 * unit) * 4  # the freed weights hold no memory (fp32)
    for layer in plan.layers:
        attn = attention(model, layer)
        assert isinstance(attn.q_proj, GatheredLinear) and isinstance(attn.o_proj, GatheredLinear) == share_o
        assert not any(n.startswith(("q_proj.", "k_proj.", "v_proj.")) for n, _ in attn.named_parameters())
    assert getattr(model, BANK).q.shape[0] == len(plan.layers) * 2 - 4
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-5, atol=1e-6)
    assert best_matches(model).layer.shape == (6, 2)  # similarity still reads the gathered weights


def test_split_units_are_stored_once_and_compute_the_copied_model(arch, tmp_path):
    """Split plans free exactly their query heads' W_q rows and KV heads' W_k/W_v rows (and, with share_o, the
    query heads' o columns), memory included, and compute what a model with those slices copied computes."""
    from helpers import logits, random_ids

    from attnshare.methods.directshare import DirectShareConfig

    model = tiny_model(arch, num_layers=6)
    geo = geometry(model)
    d = geo.head_dim
    plan = get_method("directshare").make_plan(model, DirectShareConfig(ratio=0.3, granularity="split", share_o=True,
                                                                        norms="own", **SMALL_LOSS))
    assert plan.q_pairs and plan.pairs
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for kinds, pairs in ((("q", "o"), plan.q_pairs), (("k", "v"), plan.pairs)):
            for layer, unit, root_layer, root_unit in pairs:
                dst, src = attention(ref, layer), attention(ref, root_layer)
                for kind in kinds:
                    w_dst, w_src = getattr(dst, f"{kind}_proj").weight, getattr(src, f"{kind}_proj").weight
                    if kind == "o":
                        w_dst[:, unit * d:(unit + 1) * d] = w_src[:, root_unit * d:(root_unit + 1) * d]
                        continue
                    w_dst[unit * d:(unit + 1) * d] = w_src[root_unit * d:(root_unit + 1) * d]
                    b_dst, b_src = getattr(dst, f"{kind}_proj").bias, getattr(src, f"{kind}_proj").bias
                    if b_dst is not None:
                        b_dst[unit * d:(unit + 1) * d] = b_src[root_unit * d:(root_unit + 1) * d]
    params = model.num_parameters()
    attnshare.apply(model, plan)
    tensors = {p.untyped_storage().data_ptr(): p for p in model.parameters()}.values()
    assert sum(p.untyped_storage().nbytes() for p in tensors) == model.num_parameters() * 4 == (
        params - plan.reached["params"]) * 4
    ids = random_ids(2, 20)
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-5, atol=1e-6)


def test_bad_split_plans_are_one_sentence():
    from attnshare.methods.directshare import DirectSharePlan

    geo = geometry(tiny_model("llama"))  # H=4, Hkv=2
    for plan, message in [
        (DirectSharePlan(granularity="heads"), "Unknown DirectShare granularity 'heads'"),
        (DirectSharePlan(q_pairs=[(1, 0, 0, 0)]), "has no query-head pairs"),
        (DirectSharePlan(granularity="split", q_pairs=[(1, 4, 0, 0)]), "out of range for a model with 4 query-head units per layer"),
        (DirectSharePlan(granularity="split", pairs=[(1, 2, 0, 0)]), "out of range for a model with 2 KV-head units per layer"),
    ]:
        with pytest.raises(AttnshareError, match=message):
            plan.validate(geo)


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_ratio_out_of_range_is_one_sentence(ratio):
    from attnshare.methods.directshare import DirectShareConfig

    with pytest.raises(AttnshareError, match=r"--ratio must be in \[0, 1\)"):
        DirectShareConfig(ratio=ratio)


def test_unknown_match_in_config_and_plan():
    from attnshare.methods.directshare import DirectShareConfig, DirectSharePlan

    with pytest.raises(AttnshareError, match="Unknown match function 'qv'"):
        DirectShareConfig(match="qv")
    with pytest.raises(AttnshareError, match="Unknown match function"):
        attnshare.apply(tiny_model("llama"), DirectSharePlan(pairs=[(1, 0, 0, 0)], match="x"))


def test_model_without_projections_is_refused_and_left_untouched():
    from helpers import logits, random_ids

    from attnshare.methods.directshare import DirectSharePlan
    from attnshare.methods.sa import SAPlan

    model = attnshare.apply(tiny_model("llama"), SAPlan(donors={2: 1}))
    with pytest.raises(AttnshareError, match="Layer 2 has no q_proj weights"):
        ds_plan(model, ratio=0.3)
    ids = random_ids(1, 8)
    ref = logits(model, ids)
    with pytest.raises(AttnshareError, match="Layer 2 has no q_proj weights"):
        attnshare.apply(model, DirectSharePlan(pairs=[(3, 0, 2, 1)]))
    assert torch.equal(logits(model, ids), ref)


@pytest.mark.parametrize(
    "pairs, message",
    [
        ([(2, 0, 2, 1)], "a root must be in an earlier layer"),
        ([(2, 0, 1, 0), (1, 0, 0, 0)], "is replaced itself"),
        ([(2, 5, 1, 0)], r"units 0\.\.1"),
        ([(9, 0, 1, 0)], "layers 0..3"),
        ([(2, 0, 1, 0), (2, 0, 0, 0)], "replaces a unit twice"),
    ],
)
def test_bad_plans_are_refused(pairs, message):
    from attnshare.methods.directshare import DirectSharePlan

    with pytest.raises(AttnshareError, match=message):
        attnshare.apply(tiny_model("llama"), DirectSharePlan(pairs=pairs))


def test_applying_weight_sharing_twice_is_refused():
    model = tiny_model("llama")
    attnshare.apply(model, ds_plan(model, ratio=0.25))
    with pytest.raises(AttnshareError, match="already applied"):
        attnshare.apply(model, ds_plan(tiny_model("llama"), ratio=0.25))


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_apply_directshare(tmp_path):
    from test_foundation import _tiny_tokenizer

    from attnshare.cli import main

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    art = tmp_path / "art"
    assert main(["apply", "--model", str(folder), "--method", "directshare", "--ratio", "0.25", "--match", "qk",
                 "--out", str(art)]) == 0
    report = json.loads((art / "apply.json").read_text())
    assert report["params saved"] == 2 * unit_params(tiny_model("llama"), False)
    assert main(["apply", "--model", str(folder), "--method", "directshare", "--ratio", "1", "--out",
                 str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


# -------------------------------------------------------------------------------------------------- real model


@pytest.mark.real
def test_real_smollm2_parameters_drop_exactly(real_model):
    from helpers import logits

    from attnshare.methods import get_method
    from attnshare.methods.directshare import DirectShareConfig, DirectSharePlan

    model, tok = real_model
    plan = get_method("directshare").make_plan(model, DirectShareConfig(ratio=0.1, select="cosine"))
    assert len(plan.pairs) == 9  # floor(0.1 * 30 layers * 3 KV groups)
    ids = tok("The plays of Shakespeare were printed in folio.", return_tensors="pt").input_ids
    ref = logits(model, ids)
    params = model.num_parameters()
    attnshare.apply(model, plan, keep_originals=True)
    try:
        assert params - model.num_parameters() == 9 * (3 * 64 + 64 + 64) * 576
        assert torch.isfinite(logits(model, ids)).all()
    finally:
        attnshare.unapply(model)
    assert torch.equal(logits(model, ids), ref)
    assert isinstance(DirectSharePlan.from_dict(plan.to_dict()), DirectSharePlan)


def test_runs_of_consecutive_bank_rows():
    from attnshare.methods.directshare.modules import runs_of

    assert runs_of([5, 6, 2]) == [(5, 2), (2, 1)]
    assert runs_of([0, 1, 2]) == [(0, 3)]
    assert runs_of([3, 3]) == [(3, 1), (3, 1)]


def test_config_for_parameter_saving_meets_the_target_with_the_fewest_units(tmp_path):
    """compare's equal-savings entry: the fewest replaced units that save the fraction; no KV saving to offer."""
    from attnshare.methods import get_method
    from attnshare.methods.directshare.plan import GROUP, part_parameters

    model, _ = loaded_tiny(tmp_path)
    ds = get_method("directshare")
    assert ds.config_for_saving(model, "kv", 0.1) is None  # every layer keeps its own K and V
    assert get_method("postshare").config_for_saving(model, "params", 0.01) is None  # needs training
    per_unit = part_parameters(model, GROUP)
    attn = attention(model, 0)
    assert per_unit == sum(getattr(attn, n).weight.numel() for n in ("q_proj", "k_proj", "v_proj")) // units(
        geometry(model))
    for wanted in (1, 3):
        fraction = (wanted - 0.5) * per_unit / model.num_parameters()
        config = ds.config_for_saving(model, "params", fraction)
        plan = ds.make_plan(model, dataclasses.replace(config, **SMALL_LOSS))
        assert len(plan.pairs) == wanted
        saved = model.num_parameters() - attnshare.apply(copy.deepcopy(model), plan).num_parameters()
        assert saved == wanted * per_unit >= fraction * model.num_parameters()
    assert ds.config_for_saving(model, "params", 0.9) is None  # more than all units of layers 1..L-1


@pytest.mark.parametrize("select", ["cosine", "loss"])
def test_units_share_only_within_their_attention_kind(select):
    """On alternating sliding / full layers (different windows and RoPE bases) every root is of its unit's kind;
    layer 1, the first full layer, has no donor and keeps its units."""
    model = tiny_model("gemma3_text")
    geo = geometry(model)
    plan = get_method("directshare").make_plan(
        model, DirectShareConfig(ratio=0.5, select=select, **({"loss_tokens": 64} if select == "loss" else {})))
    assert plan.pairs and all(geo.layer_types[l] == geo.layer_types[rl] for l, _, rl, _ in plan.pairs)
    assert all(l != 1 for l, *_ in plan.pairs)
    assert plan.reached["units"] == len(plan.pairs) and plan.reached["of"] == geo.num_layers * units(geo)


def test_a_cross_kind_plan_is_refused_in_one_sentence():
    geo = geometry(tiny_model("gemma3_text"))
    with pytest.raises(AttnshareError, match=r"same attention kind \(window and RoPE base\)"):
        DirectSharePlan(pairs=[(1, 0, 0, 0)]).validate(geo)  # layer 1 is full, layer 0 sliding


def test_the_summary_says_what_the_plan_reached_next_to_what_was_asked():
    """Ratio 0.3 of 8 units is floor(2.4) = 2 units: the summary says 25.0% next to the 30.0% asked."""
    model = tiny_model("llama")  # 4 layers x 2 KV groups
    plan = ds_plan(model, ratio=0.3)
    text = plan.summary()
    assert "2/8 units = 25.0% (asked 30.0%)" in text and "of attention" in text
    assert DirectSharePlan.from_dict(json.loads(json.dumps(plan.to_dict()))).summary() == text


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_q_k_norms_travel_with_a_whole_layers_weights_stored_once(arch, tmp_path):
    """A layer whose every unit reuses units of one layer runs that layer's q_norm/k_norm (``norms="donor"``, the
    default): the same logits as writing the donor's slices and norms in place (what the planner measures), one
    norm fewer in the parameters, the norm stored once in the bank for the lender and its borrower; a later SA plan
    that removes the borrower keeps it for the lender, one that removes both frees it; save/load and unapply hold."""
    from conftest import tiny_checkpoint

    from attnshare.arch import arch_of
    from attnshare.methods.directshare.loss_planner import units_replaced
    from attnshare.methods.directshare.method import BANK
    from attnshare.methods.directshare.modules import SharedNorm
    from attnshare.methods.sa import SAPlan

    folder = str(tiny_checkpoint(tmp_path / arch, arch, 6))
    base, _ = attnshare.load_model(folder)
    with torch.no_grad():  # random norms, so that whose norm a layer runs matters
        gen = torch.Generator().manual_seed(0)
        for layer in base.model.layers:
            for name in ("q_norm", "k_norm"):
                getattr(layer.self_attn, name).weight.copy_(torch.randn(16, generator=gen))
    base.save_pretrained(folder)  # the checkpoint that unapply refills freed weights from
    base, _ = attnshare.load_model(folder)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    assign = {(5, 0): (3, 1), (5, 1): (3, 0)}  # layers 3 and 5 attend alike (full layers on Gemma-3's pattern)
    pairs = sorted((*unit, *root) for unit, root in assign.items())
    outs, counts = {}, {}
    for norms in ("own", "donor"):
        with units_replaced(base, assign, ("q", "k", "v"), arch_of(base), norms=norms), torch.no_grad():
            want = base(ids).logits
        model = attnshare.apply(copy.deepcopy(base), DirectSharePlan(pairs=pairs, norms=norms))
        with torch.no_grad():
            outs[norms] = model(ids).logits
        torch.testing.assert_close(outs[norms], want, rtol=1e-5, atol=1e-5)
        counts[norms] = model.num_parameters()
    assert not torch.allclose(outs["own"], outs["donor"])
    assert counts["own"] - counts["donor"] == 2 * 16  # layer 5's own q_norm and k_norm are gone

    plan = DirectSharePlan(pairs=pairs, norms="donor")
    model = attnshare.apply(copy.deepcopy(base), plan)
    bank = getattr(model, BANK)
    assert sorted(bank.norms) == ["k_norm_3", "q_norm_3"]
    for layer in (3, 5):
        attn = model.model.layers[layer].self_attn
        assert isinstance(attn.q_norm, SharedNorm) and attn.q_norm.key == "q_norm_3"
    assert isinstance(model.model.layers[4].self_attn.q_norm, torch.nn.Module)
    assert not isinstance(model.model.layers[4].self_attn.q_norm, SharedNorm)

    out = attnshare.save(model, tmp_path / "art")
    loaded, _ = attnshare.load(out, model=copy.deepcopy(base))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, outs["donor"])

    before = model.num_parameters()
    attnshare.apply(model, SAPlan(donors={5: 1}))  # the borrower no longer runs q/k: the lender still does
    assert sorted(bank.norms) == ["k_norm_3", "q_norm_3"]
    both = attnshare.apply(copy.deepcopy(base), plan)
    attnshare.apply(both, SAPlan(donors={3: 1, 5: 1}))  # neither runs q/k any more: the norms are freed
    assert len(getattr(both, BANK).norms) == 0
    assert model.num_parameters() == before  # receiver 5 owned none of its q/k slices or norms: nothing to free
    attnshare.unapply(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_norms_travel_only_where_a_layer_reads_one_lender():
    """Lenders: a layer whose units all reuse one other layer; a partly replaced layer, or one reading two layers,
    keeps its norms; ``norms="own"`` moves none; a plan saved before the field reads as "own"."""
    from attnshare.methods.directshare.plan import lenders

    assert lenders({(5, 0): (3, 1), (5, 1): (3, 0)}, 2) == {5: 3}
    assert lenders({(5, 0): (3, 1)}, 2) == {}
    assert lenders({(5, 0): (3, 1), (5, 1): (2, 0)}, 2) == {}
    geo = geometry(tiny_model("qwen3"))
    plan = DirectSharePlan(pairs=[(2, 0, 0, 0), (3, 0, 1, 1), (3, 1, 1, 0)], norms="donor")
    assert plan.norm_lenders(geo) == {("q_norm", 3): 1, ("k_norm", 3): 1}
    assert dataclasses.replace(plan, norms="own").norm_lenders(geo) == {}
    split = DirectSharePlan(granularity="split", pairs=[(3, 0, 1, 0), (3, 1, 1, 1)],
                            q_pairs=[(3, h, 1, h) for h in range(3)], norms="donor")  # 3 of 4 query heads
    assert split.norm_lenders(geo) == {("k_norm", 3): 1}
    assert DirectSharePlan.from_dict({"pairs": [[3, 0, 1, 1]]}).norms == "own"
    assert DirectSharePlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(AttnshareError, match="--norms must be donor or own"):
        DirectShareConfig(norms="mine")
