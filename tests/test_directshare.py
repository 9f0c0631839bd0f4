"""DirectShare: weight similarity, stored-once sharing, parity, artifacts, composition with SA, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model

import attnshare
from attnshare.analysis.weights import (
    MATCH_FUNCTIONS,
    WeightMatches,
    best_matches,
    match_statistics,
    unit_similarity,
    unit_vectors,
    units,
)
from attnshare.arch import attention, geometry
from attnshare.errors import AttnshareError

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
    assert (m.layer[1:] < torch.arange(1, 4).unsqueeze(1)).all()  # always an earlier layer
    stats = match_statistics(m)
    assert stats["max"] == pytest.approx(1.0, rel=1e-5) and stats["units"] == 6
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
