"""Analysis and planners: golden metrics, streaming statistics against a brute-force reference, planners on tiny
models of every architecture, bad input."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import tiny_model
from helpers import logits, random_ids

import attnshare
from attnshare.analysis.collect import CalibrationConfig, calibration_blocks
from attnshare.analysis.heads import head_maps_for, head_similarity
from attnshare.analysis.metrics import (
    LN2,
    best_permutation,
    head_cosine,
    head_js_similarity,
    js_divergence,
    js_similarity,
)
from attnshare.analysis.stats import AttentionStats, collect_stats
from attnshare.arch import geometry
from attnshare.errors import AttnshareError
from attnshare.methods.lisa.planner import choose_lisa_layers
from attnshare.methods.sa import SAConfig, SAPlan
from attnshare.methods.sa.planner import plan_sa

SMALL = {"calib_tokens": 64, "calib_seq_len": 32, "heldout_tokens": 32}


def random_maps(b=2, h=4, n=6, s=10, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, h, n, s, generator=g) * 3, dim=-1)


# golden metrics -------------------------------------------------------------------------------------------------
def test_js_of_identical_maps_is_zero_and_of_disjoint_maps_is_ln2():
    p = random_maps()
    assert torch.allclose(js_divergence(p, p), torch.zeros(p.shape[:-1]), atol=1e-6)
    assert torch.allclose(js_similarity(p, p), torch.ones(p.shape[:-1]), atol=1e-6)
    a = torch.tensor([0.5, 0.5, 0.0, 0.0])
    b = torch.tensor([0.0, 0.0, 0.25, 0.75])
    assert js_divergence(a, b).item() == pytest.approx(LN2, abs=1e-6)
    assert js_similarity(a, b).item() == pytest.approx(0.0, abs=1e-6)


def test_js_matches_definition():
    p, q = random_maps(seed=1), random_maps(seed=2)
    m = (p + q) / 2
    kl = lambda x, y: (x * (x / y).log()).sum(-1)
    torch.testing.assert_close(js_divergence(p, q), 0.5 * kl(p, m) + 0.5 * kl(q, m), rtol=1e-4, atol=1e-6)


def test_hungarian_recovers_a_planted_permutation():
    earlier = random_maps(h=6, seed=3)
    perm = [4, 0, 5, 2, 1, 3]  # later head h is a noisy copy of earlier head perm[h]
    noise = random_maps(h=6, seed=4)
    later = 0.9 * earlier[:, perm] + 0.1 * noise
    sim = head_js_similarity(later, earlier) / (2 * 6)  # sums over B*N rows -> means
    assert best_permutation(sim) == perm
    assert best_permutation(head_cosine(later, earlier)) == perm
    assert sim.max() <= 1 + 1e-6 and sim.min() >= 0


# streaming statistics -------------------------------------------------------------------------------------------
def test_stats_match_brute_force_over_eager_attention():
    """Layer and head similarity from streamed hooks equal a direct computation over output_attentions maps."""
    model = tiny_model("llama", attn_implementation="eager")
    blocks = random_ids(3, 24, seed=5)
    skip = 4
    stats = collect_stats(model, blocks, head_pairs=[(0, 1), (1, 3)], skip=skip)
    with torch.no_grad():
        maps = model(blocks, output_attentions=True, use_cache=False).attentions  # L x (B,H,T,S)
    maps = [m[:, :, skip:].float() for m in maps]
    for i in range(4):
        for j in range(4):
            ref = js_similarity(maps[i], maps[j]).mean()
            assert stats.layer_js()[i, j].item() == pytest.approx(ref.item(), abs=1e-5)
    ref = head_js_similarity(maps[3], maps[1]) / (3 * (24 - skip))
    torch.testing.assert_close(stats.head_js((1, 3)), ref.double(), rtol=1e-5, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(maps[0].flatten(2), maps[2].flatten(2), dim=-1).mean()
    assert stats.layer_cosine()[0, 2].item() == pytest.approx(cos.item(), abs=1e-5)
    mean_map = js_similarity(maps[1].mean(1), maps[2].mean(1)).mean()
    assert stats.mean_map_js()[1, 2].item() == pytest.approx(mean_map.item(), abs=1e-5)


def test_memory_does_not_grow_with_batches():
    model = tiny_model("llama")
    few = collect_stats(model, random_ids(1, 32), head_pairs=[(0, 1), (2, 3)], batch_size=1)
    many = collect_stats(model, random_ids(6, 32), head_pairs=[(0, 1), (2, 3)], batch_size=1)
    assert few.nbytes() == many.nbytes() > 0
    assert many.rows == 6 * (32 - 16) and not many._batch  # batch maps freed after every batch
    stats = AttentionStats(4, 4, skip=0)
    for _ in range(5):
        for layer in range(4):
            stats.add(layer, random_maps(b=1, h=4, n=8, s=8))
        assert len(stats._batch) == 4  # at most one batch's maps, one entry per layer
        stats.end_batch()
    assert stats.nbytes() == 3 * 4 * 4 * 8 and stats.rows == 5 * 8


def test_recording_leaves_the_model_unchanged(arch):
    model = tiny_model(arch)
    ids = random_ids(2, 16)
    ref = logits(model, ids)
    stats = collect_stats(model, random_ids(2, 32, seed=1), head_pairs=[(0, 2)], skip=2)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(logits(model, ids), ref)
    sim = stats.layer_js()
    assert torch.allclose(sim, sim.T) and torch.allclose(torch.diagonal(sim), torch.ones(4, dtype=sim.dtype))
    assert sim.min() >= 0 and sim.max() <= 1 + 1e-9


# planners --------------------------------------------------------------------------------------------------------
def test_head_maps_are_permutations(arch):
    model = tiny_model(arch)
    geo = geometry(model)
    donors = {3: 1} if arch == "gemma3_text" else {2: 1, 3: 1}
    maps = head_maps_for(model, donors, tokens=64, seq_len=32)
    assert sorted(maps) == sorted(donors)
    assert all(sorted(m) == list(range(geo.num_heads)) for m in maps.values())


def test_head_maps_follow_a_planted_head_permutation():
    """Layer 1 attends exactly like layer 0 with heads permuted: its q/k weights are permuted copies of layer 0's
    (kv groups swapped too, so GQA stays consistent) and its input equals layer 0's (layer 0's outputs zeroed)."""
    model = tiny_model("llama", num_layers=2)
    layers = model.model.layers
    perm, kv_perm, d = [2, 3, 1, 0], [1, 0], 16  # receiver head h copies donor head perm[h]; perm[h]//2 = kv_perm[h//2]
    with torch.no_grad():
        layers[0].self_attn.o_proj.weight.zero_()
        layers[0].mlp.down_proj.weight.zero_()
        layers[1].input_layernorm.weight.copy_(layers[0].input_layernorm.weight)
        q0 = layers[0].self_attn.q_proj.weight.view(4, d, -1)  # (H, d, D)
        k0 = layers[0].self_attn.k_proj.weight.view(2, d, -1)  # (Hkv, d, D)
        layers[1].self_attn.q_proj.weight.copy_(q0[perm].reshape(4 * d, -1))
        layers[1].self_attn.k_proj.weight.copy_(k0[kv_perm].reshape(2 * d, -1))
    assert head_maps_for(model, {1: 0}, tokens=64, seq_len=32) == {1: perm}


def test_plan_sa_meets_its_budget_and_leaves_the_model_unchanged(arch):
    model = tiny_model(arch, num_layers=6)
    ids = random_ids(1, 16)
    ref = logits(model, ids)
    plan = attnshare.get_method("sa").make_plan(model, SAConfig(budget=3, align_heads=True, **SMALL))
    assert isinstance(plan, SAPlan) and len(plan.donors) == 3 and 0 not in plan.donors
    assert sorted(plan.head_map) == plan.receivers
    plan.validate(geometry(model))
    assert torch.equal(logits(model, ids), ref)
    attnshare.apply(model, plan)  # the plan applies


def test_plan_sa_kv_saving_budget():
    model = tiny_model("llama", num_layers=6)
    plan = plan_sa(model, SAConfig(kv_saving=0.2, **SMALL), progress=False)  # ceil(0.2 * 12) = 3 receivers
    assert len(plan.donors) == 3 and not plan.head_map


def test_plan_sa_greedy_picks_the_cheapest_layer():
    """A layer whose attention output is zeroed does not matter, so it is the first receiver chosen."""
    model = tiny_model("llama", num_layers=6)
    with torch.no_grad():
        model.model.layers[4].self_attn.o_proj.weight.zero_()
    plan = plan_sa(model, SAConfig(budget=1, **SMALL), progress=False)
    assert plan.receivers == [4]


def test_choose_lisa_layers(arch):
    model = tiny_model(arch, num_layers=6)
    calib = CalibrationConfig(calib_tokens=64, calib_seq_len=32, heldout_tokens=32)
    layers, probe = choose_lisa_layers(model, 0.5, calib, progress=False)
    assert probe.measured == len(probe.valid_receivers([]))  # each candidate measured once
    assert len(layers) == 3 and 0 not in layers and layers == sorted(layers)


# bad input ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5, 0.05])
def test_lisa_fraction_out_of_range(fraction):
    with pytest.raises(AttnshareError, match="fraction|LiSA"):
        choose_lisa_layers(tiny_model("llama"), fraction, CalibrationConfig(calib_tokens=64))


@pytest.mark.parametrize("config, message", [
    ({"budget": 4}, "out of range"),
    ({"budget": 9}, "out of range"),
    ({"kv_saving": 0.49}, "out of range"),
])
def test_sa_budget_out_of_range(config, message):
    with pytest.raises(AttnshareError, match=message):
        plan_sa(tiny_model("llama"), SAConfig(**config, **SMALL), progress=False)


@pytest.mark.parametrize("config, message", [
    ({"budget": -1}, "budget"),
    ({"budget": 2.5}, "number of receiver layers"),
    ({"kv_saving": 0.6}, "kv-saving"),
    ({"budget": 2, "kv_saving": 0.1}, "not both"),
    ({"budget": 2, "screen_tokens": 1}, "--screen-tokens must be 0"),
    ({"budget": 2, "measure_precision": "fp16"}, "--measure-precision must be auto or"),
])
def test_sa_config_rejects_bad_budgets(config, message):
    with pytest.raises(AttnshareError, match=message):
        SAConfig(**config)
    assert SAConfig(budget=3.0).budget == 3


def test_calibration_refuses_evaluation_texts():
    with pytest.raises(AttnshareError, match="evaluation text"):
        calibration_blocks(tiny_model("llama"), "britannica", 64, 32)


def test_calibration_refuses_too_long_sequences():
    with pytest.raises(AttnshareError, match="context"):
        head_maps_for(tiny_model("llama"), {2: 1}, tokens=1024, seq_len=512)


def test_planning_refuses_a_shared_model():
    model = tiny_model("llama")
    attnshare.apply(model, SAPlan(donors={2: 1}))
    with pytest.raises(AttnshareError, match="already has sharing"):
        head_maps_for(model, {3: 1}, tokens=64, seq_len=32)


def test_plan_for_another_model_is_refused():
    plan = plan_sa(tiny_model("llama", num_layers=6), SAConfig(budget=2, **SMALL), progress=False)
    plan.donors = {5: 4, **plan.donors}
    with pytest.raises(AttnshareError, match="make the plan for this model"):
        attnshare.apply(tiny_model("llama", num_layers=4), plan)


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0))
    with pytest.raises(AttnshareError, match="not supported; supported types are"):
        head_maps_for(model, {1: 0}, tokens=32, seq_len=16)



# analyze + CLI ---------------------------------------------------------------------------------------------------
def test_analyze_writes_numbers_and_heatmaps(tmp_path):
    from safetensors.torch import load_file

    from attnshare.analysis.analyze import AnalyzeConfig, analyze

    model = tiny_model("llama", num_layers=4)
    config = AnalyzeConfig(tokens=64, seq_len=32, skip_rows=4, heldout_tokens=32, sensitivity_every=1)
    result = analyze(model, config, progress=False)
    paths = result.save(tmp_path)
    names = {p.name for p in paths}
    assert {"analysis.json", "analysis.safetensors", "layer_similarity.png", "head_similarity.png",
            "sensitivity.png"} <= names
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert len(data["layer_js"]) == 4 and len(data["adjacent_js"]) == 3
    assert [r["layer"] for r in data["sensitivity"]] == [1, 2, 3]
    for row in data["heads"]:  # the Hungarian map is never worse than the identity map
        assert row["aligned"] >= row["unaligned"] - 1e-9 and sorted(row["permutation"]) == [0, 1, 2, 3]
    tensors = load_file(tmp_path / "analysis.safetensors")
    assert torch.equal(tensors["layer_js"], result.layer_js)
    if importlib.util.find_spec("attnshare.analysis.weights"):
        assert "weight_similarity.png" in names and data["weights"]["match"] == "qk"


def test_analyze_sampled_sensitivity_and_window():
    from attnshare.analysis.analyze import AnalyzeConfig, analyze

    model = tiny_model("gemma3_text", num_layers=6)
    config = AnalyzeConfig(tokens=64, seq_len=32, skip_rows=4, heldout_tokens=32, sensitivity_every=2,
                           head_window=2, weight_match="none")
    result = analyze(model, config, progress=False)
    assert sorted(result.head_js) == [(a, b) for b in range(6) for a in range(max(0, b - 2), b)]
    assert [r["layer"] for r in result.sensitivity] == [2, 4]  # layer 1 has no earlier layer of its kind


@pytest.fixture
def tiny_folder(tmp_path):
    from test_foundation import _tiny_tokenizer

    folder = tmp_path / "tiny"
    tiny_model("llama", num_layers=6).save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder


def test_plan_cli_writes_a_plan_that_apply_reads(tiny_folder, tmp_path, capsys):
    from attnshare.cli import main

    out = tmp_path / "plans" / "sa.json"
    small = ["--calib-tokens", "64", "--calib-seq-len", "32", "--heldout-tokens", "32"]
    assert main(["plan", "--model", str(tiny_folder), "--method", "sa", "--budget", "2", "--align-heads",
                 "--out", str(out), *small]) == 0
    plan = attnshare.load_plans(out)[0]
    assert len(plan.donors) == 2 and sorted(plan.head_map) == plan.receivers
    assert main(["plan", "--model", str(tiny_folder), "--plan", str(out)]) == 0
    assert main(["apply", "--model", str(tiny_folder), "--plan", str(out), "--out", str(tmp_path / "art")]) == 0


def test_analyze_cli(tiny_folder, tmp_path, capsys):
    from attnshare.cli import main

    assert main(["analyze", "--model", str(tiny_folder), "--tokens", "64", "--seq-len", "32", "--skip-rows", "4",
                 "--heldout-tokens", "32", "--sensitivity-every", "2", "--no-progress", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "analysis.json").is_file() and (tmp_path / "a" / "layer_similarity.png").is_file()
    assert "KL aligned" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["plan", "--method", "sa", "--budget", "9", "--out", "OUT"], "out of range"),
    (["plan", "--method", "sa", "--budget", "2.5", "--out", "OUT"], "number of receiver layers"),
    (["plan", "--method", "sa", "--kv-saving", "0.7", "--out", "OUT"], "kv-saving"),
    (["plan", "--method", "sa", "--budget", "2", "--calib-text", "hamlet", "--out", "OUT"], "evaluation text"),
    (["plan", "--plan", "BIG", "--out", "OUT"], "make the plan for this model"),
    (["plan", "--method", "sa", "--budget", "2"], "--out"),
    (["analyze", "--tokens", "16", "--seq-len", "32", "--out", "OUT"], "--tokens"),
    (["analyze", "--text", "britannica", "--tokens", "64", "--seq-len", "32", "--out", "OUT"], "evaluation text"),
])
def test_cli_bad_input_is_one_sentence(tiny_folder, tmp_path, capsys, argv, message):
    from attnshare.cli import main

    big = tmp_path / "big.json"
    attnshare.save_plans(SAPlan(donors={9: 8}), big)
    argv = [{"OUT": str(tmp_path / "out"), "BIG": str(big)}.get(a, a) for a in argv] + ["--model", str(tiny_folder)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_unsupported_model_folder_is_refused_by_analyze(tmp_path, capsys):
    from test_foundation import _tiny_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from attnshare.cli import main

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0)).save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    argv = ["analyze", "--model", str(folder), "--tokens", "32", "--seq-len", "16", "--skip-rows", "2"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert "supported types are" in capsys.readouterr().err


@pytest.mark.real
def test_real_model_head_alignment_beats_identity(real_model):
    """On SmolLM2, the Hungarian head map of an adjacent pair is a permutation at least as similar as the identity."""

    model, tok = real_model
    sims = head_similarity(model, [(4, 5)], tokens=256, seq_len=256, tokenizer=tok)
    sim = sims[(4, 5)]
    perm = best_permutation(sim)
    assert sorted(perm) == list(range(9))
    aligned = sum(sim[h, perm[h]] for h in range(9)) / 9
    assert aligned >= torch.diagonal(sim).mean() and 0 < float(sim.min()) <= float(sim.max()) <= 1


@pytest.mark.parametrize("method, budget, extra", [
    ("directshare", "0.3", []),
    ("lisa", "0.5", ["--calib-tokens", "64", "--calib-seq-len", "32", "--heldout-tokens", "32"]),
])
def test_plan_cli_budget_reaches_every_method(tiny_folder, tmp_path, method, budget, extra):
    """--budget sets each method's own budget field (LiSA's fraction, DirectShare's ratio)."""
    from attnshare.cli import main

    out = tmp_path / f"{method}.json"
    assert main(["plan", "--model", str(tiny_folder), "--method", method, "--budget", budget, *extra,
                 "--out", str(out)]) == 0
    plan = attnshare.load_plans(out)[0]
    assert plan.method == method
    plan.validate(geometry(tiny_model("llama", num_layers=6)))
