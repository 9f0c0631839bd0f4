"""Bench: the byte model's exact numbers on a tiny config, KV bytes measured vs modelled, and the harness and CLI
end to end on tiny models (no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config, tiny_model
from test_foundation import _tiny_tokenizer

import attnshare
from attnshare.arch import geometry
from attnshare.bench import (
    BenchConfig,
    artifact_variant,
    base_variant,
    decode_bytes,
    decode_bytes_per_step,
    get_scenario,
    ideal_ratio,
    max_batch_under_budget,
    model_costs,
    plan_variant,
    prefill_flops,
    run_bench,
)
from attnshare.bench.bytemodel import causal_pairs, kv_cache_bytes
from attnshare.bench.harness import Scenario
from attnshare.cli import main
from attnshare.errors import AttnshareError
from attnshare.hf_compat import tile_cache
from attnshare.memory import cache_bytes
from attnshare.methods.sa import SAPlan
from attnshare.methods.sa.plan import nearest_donors

# tiny llama (tests/conftest.py): L=4, D=64, H=4, Hkv=2, d=16, I=96, V=128, untied embeddings, float32
D, H, HKV, HD, INTER, VOCAB, LAYERS, F32 = 64, 4, 2, 16, 96, 128, 4, 4
Q, K, V, O, MLP = D * H * HD, D * HKV * HD, D * HKV * HD, H * HD * D, 3 * D * INTER  # weight elements per layer
NORMS = 2 * D  # two RMSNorm weights per layer


def _sa(model, receivers=(2, 3)) -> SAPlan:
    return SAPlan(donors=nearest_donors(list(receivers), geometry(model)))


def test_byte_model_inputs_are_exact_on_a_tiny_config():
    costs = model_costs(tiny_model("llama"))
    layer = Q + K + V + O + MLP + NORMS
    # decode reads every weight except the untied input embedding (only B rows of it are gathered)
    assert costs.weight_bytes == F32 * (LAYERS * layer + D + VOCAB * D)  # layers + final norm + lm_head
    assert costs.kv_bytes_per_token == (2 * HKV * HD * F32,) * LAYERS  # K and V: 256 bytes per token per layer
    assert costs.windows == (None,) * LAYERS
    assert costs.linear_flops_per_token == 2 * LAYERS * (Q + K + V + O + MLP)  # 245,760
    assert costs.head_flops_per_token == 2 * VOCAB * D
    assert costs.score_dims == (H * HD,) * LAYERS and costs.value_dims == (H * HD,) * LAYERS


def test_byte_model_sees_what_sa_removes():
    base, shared = tiny_model("llama"), attnshare.apply(tiny_model("llama"), _sa(tiny_model("llama")))
    b, s = model_costs(base), model_costs(shared)
    assert b.weight_bytes - s.weight_bytes == 2 * F32 * (Q + K)  # two receivers lost q_proj and k_proj
    assert s.kv_bytes_per_token == (256, 256, 128, 128)  # receivers cache V only
    assert b.linear_flops_per_token - s.linear_flops_per_token == 2 * 2 * (Q + K)
    assert s.score_dims == (64, 64, 0, 0) and s.value_dims == (64,) * 4


def test_byte_model_pure_functions_exact_numbers():
    costs = model_costs(tiny_model("llama"))
    w = costs.weight_bytes  # 526,592
    assert w == 526_592
    assert decode_bytes_per_step(costs, batch=2, context=10) == w + 2 * 10 * 4 * 256
    assert decode_bytes(costs, batch=1, context=10, new_tokens=3) == 3 * w + (10 + 11 + 12) * 1024
    assert causal_pairs(4, 0) == 1 + 2 + 3 + 4
    assert causal_pairs(3, 5, window=6) == 6 + 6 + 6
    assert causal_pairs(2, 0, window=8) == 1 + 2
    # prefill of 4 tokens: linear on every token, lm head once, QK^T + PV on 10 causal pairs per layer
    assert prefill_flops(costs, batch=1, tokens=4) == 4 * 245_760 + 16_384 + 4 * 2 * 10 * (64 + 64)
    assert prefill_flops(costs, batch=3, tokens=4) == 3 * prefill_flops(costs, batch=1, tokens=4)
    assert ideal_ratio(300, 200) == 1.5
    params = 559_360  # 139,840 float32 parameters
    assert max_batch_under_budget(costs, params, tokens_per_sequence=100, budget_bytes=params + 5 * 102_400) == 5
    assert max_batch_under_budget(costs, params, tokens_per_sequence=100, budget_bytes=params + 102_399) == 0
    assert kv_cache_bytes((10, 20), (None, 4), batch=2, context=6) == 2 * (10 * 6 + 20 * 4)


def test_sliding_layers_are_windowed():
    costs = model_costs(tiny_model("gemma3_text"))
    window = tiny_config("gemma3_text").sliding_window
    assert costs.windows == (window, None, window, None)
    assert kv_cache_bytes(costs.kv_bytes_per_token, costs.windows, 1, 100) == 256 * (window + 100 + window + 100)


def test_measured_cache_bytes_match_the_byte_model(arch):
    if arch == "gemma3_text":
        pytest.skip("sliding layers keep window - 1 tokens at rest; covered by test_sliding_layers_are_windowed")
    from transformers import DynamicCache

    for model in (tiny_model(arch), attnshare.apply(tiny_model(arch), _sa(tiny_model(arch)))):
        costs = model_costs(model)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(torch.zeros(3, 20, dtype=torch.long), past_key_values=cache, use_cache=True)
        assert cache_bytes(cache) == kv_cache_bytes(costs.kv_bytes_per_token, costs.windows, 3, 20)
        tile_cache(cache, 2)  # SA receivers' zero-width K is tiled too (HF's batch_repeat_interleave skips it)
        assert cache_bytes(cache) == kv_cache_bytes(costs.kv_bytes_per_token, costs.windows, 6, 20)
        assert all(layer.values.shape[0] == 6 for layer in cache.layers)


def test_run_bench_end_to_end_on_a_tiny_model(arch, tmp_path):
    base = tiny_model(arch)
    shared = attnshare.apply(tiny_model(arch), _sa(base))
    art = attnshare.save(shared, tmp_path / "art")
    variants = [base_variant(base), plan_variant(base, _sa(base), name="sa"), artifact_variant(base, art)]
    scenario = Scenario("t", batch=2, context=12, new_tokens=3)
    result = run_bench(variants, scenario, BenchConfig(repeats=2, warmup=1, device="cpu", progress=False))
    assert [v.name for v in result.variants] == ["base", "sa", "art"]
    assert not hasattr(base, "attnshare_state")  # the base model was not touched by the plan variant
    for v in result.variants:
        assert v.kv_bytes == kv_cache_bytes(v.costs.kv_bytes_per_token, v.costs.windows, 2, 12 + 3) or arch == "gemma3_text"
        assert len(v.samples) == 2 and v.prefill_tok_s > 0 and v.decode_tok_s > 0
    b, sa, art_result = result.variants
    assert b.prefill_ratio == 1.0 and b.decode_ratio == 1.0 and b.ideal_decode_ratio == 1.0
    assert sa.kv_bytes < b.kv_bytes and sa.param_bytes < b.param_bytes and sa.params == art_result.params
    assert sa.ideal_decode_ratio > 1.0 and sa.ideal_prefill_ratio > 1.0
    md = result.to_markdown()
    assert "| sa |" in md and "decode × (ideal)" in md
    json.dumps(result.to_dict())  # JSON-ready


def test_max_batch_mode_uses_the_byte_model_batch():
    base = tiny_model("llama")
    scenario = Scenario("t", batch=1, context=16, new_tokens=2)
    budget_gb = 0.001
    config = BenchConfig(repeats=1, warmup=0, device="cpu", max_batch=True, memory_budget_gb=budget_gb, progress=False)
    result = run_bench([base_variant(base), plan_variant(base, _sa(base), name="sa")], scenario, config)
    b, sa = result.variants
    for v in (b, sa):
        assert v.batch == max_batch_under_budget(v.costs, v.param_bytes, 18, int(budget_gb * 1e9))
        assert v.prefill_batch == 1
        assert v.kv_bytes == kv_cache_bytes(v.costs.kv_bytes_per_token, v.costs.windows, v.batch, 18)
    assert sa.batch > b.batch  # the KV savings buy a bigger batch


def test_bad_bench_input():
    with pytest.raises(AttnshareError, match="Unknown scenario"):
        get_scenario("huge")
    with pytest.raises(AttnshareError, match="--memory-budget-gb"):
        BenchConfig(max_batch=True)
    with pytest.raises(AttnshareError, match="--repeats"):
        BenchConfig(repeats=0)
    with pytest.raises(AttnshareError, match="at least 1"):
        Scenario("x", 0, 10, 1)
    base = tiny_model("llama")
    with pytest.raises(AttnshareError, match="at least one variant"):
        run_bench([], Scenario("x", 1, 8, 1))
    with pytest.raises(AttnshareError, match="distinct"):
        run_bench([base_variant(base), base_variant(base)], Scenario("x", 1, 8, 1))
    with pytest.raises(AttnshareError, match="positions"):  # tiny models have 256 positions
        run_bench([base_variant(base)], Scenario("x", 1, 250, 10), BenchConfig(device="cpu", progress=False))
    with pytest.raises(AttnshareError, match="does not hold"):
        run_bench([base_variant(base)], Scenario("x", 1, 8, 1),
                  BenchConfig(device="cpu", max_batch=True, memory_budget_gb=1e-6, progress=False))
    with pytest.raises(AttnshareError, match="not an attnshare artifact"):
        artifact_variant(base, "/nonexistent")


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder


def test_bench_cli_writes_table_and_json(tiny_folder, tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = ["bench", "--model", str(tiny_folder), "--scenario", "tiny", "--repeats", "1", "--device", "cpu",
            "--method", "sa", "--receivers", "2", "3", "--json", str(out), "--markdown", str(tmp_path / "b.md"),
            "--no-progress", "--profile"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| base |" in printed and "| sa |" in printed
    data = json.loads(out.read_text())
    assert [v["name"] for v in data["variants"]] == ["base", "sa"]
    assert data["scenario"]["context"] == 32 and (tmp_path / "b.md").read_text().startswith("Scenario `tiny`")
    assert set(data["profiles"]) == {"base", "sa"} and "Profile of `sa`, prefill" in printed


def test_bench_on_a_static_cache_holds_the_plan_widths():
    """``--cache static``: every variant fills one preallocated cache (prompt + new tokens) per repeat; an SA
    receiver's slot holds V only there too."""
    base = tiny_model("llama")
    scenario = Scenario("t", batch=2, context=12, new_tokens=3)
    config = BenchConfig(repeats=2, warmup=1, device="cpu", progress=False, cache="static")
    result = run_bench([base_variant(base), plan_variant(base, _sa(base), name="sa")], scenario, config)
    for v in result.variants:
        assert v.kv_bytes == kv_cache_bytes(v.costs.kv_bytes_per_token, v.costs.windows, 2, 12 + 3)
        assert v.path == "eager, static cache" and v.compile_s is None
    assert result.variants[1].kv_bytes < result.variants[0].kv_bytes
    assert "| eager, static cache |" in result.to_markdown()


def test_bench_cli_compiled_runs_every_variant_compiled_beside_the_eager_base(tiny_folder, tmp_path, capsys):
    out = tmp_path / "c.json"
    argv = ["bench", "--model", str(tiny_folder), "--scenario", "tiny", "--new-tokens", "3", "--repeats", "1",
            "--device", "cpu", "--compile", "--method", "sa", "--receivers", "2", "3", "--json", str(out),
            "--no-progress", "--no-autotune"]  # the frozen, autotuned graphs: test_inductor_compiled_decode_equals_eager
    assert main(argv) == 0
    variants = json.loads(out.read_text())["variants"]
    assert [(v["name"], v["path"]) for v in variants] == [
        ("base", "compiled, static cache"), ("sa", "compiled, static cache"), ("base (eager)", "eager, dynamic cache")]
    assert all(v["compile_s"] > 0 for v in variants[:2]) and variants[2]["compile_s"] is None
    assert variants[1]["kv_bytes"] < variants[0]["kv_bytes"] == variants[2]["kv_bytes"]
    assert "| sa | compiled, static cache |" in capsys.readouterr().out
    argv[argv.index("--json") + 1] = str(tmp_path / "d.json")
    assert main([*argv, "--no-compile-prefill"]) == 0  # decode compiled, prefill eager (as HF's generate)
    assert [v["path"] for v in json.loads((tmp_path / "d.json").read_text())["variants"]] == [
        "compiled decode, static cache", "compiled decode, static cache", "eager, dynamic cache"]


def test_compiled_bench_gives_the_callers_models_back_their_attention():
    """bench --compile puts base and variants on the fast path (attnshare's GQA SDPA; compiled kernels in a shared
    model's eager prefill blocks); the models it was given (the API caller's own objects) run as before afterwards,
    with the same logits."""
    from attnshare.hf_compat import attn_implementation
    from attnshare.sharing.apply import fast_path_restored, use_fast_path
    from attnshare.sharing.state import state_of

    models = [tiny_model("llama"), attnshare.apply(tiny_model("llama"), _sa(tiny_model("llama")))]
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    before = [attn_implementation(m) for m in models]
    with torch.no_grad():
        want = [m(ids).logits for m in models]
    with fast_path_restored(models):
        for m in models:
            use_fast_path(m)
        assert [attn_implementation(m) for m in models] == ["attnshare_gqa_sdpa"] * 2
        assert state_of(models[1]).context.fused_kernels
    assert [attn_implementation(m) for m in models] == before == ["sdpa", "attnshare_sdpa"]
    assert not state_of(models[1]).context.fused_kernels
    with torch.no_grad():
        assert all(torch.equal(m(ids).logits, w) for m, w in zip(models, want))


@pytest.mark.parametrize("argv, message", [
    (["--scenario", "huge", "--method", "sa", "--receivers", "2"], "Unknown scenario"),
    (["--max-batch", "--method", "sa", "--receivers", "2"], "--memory-budget-gb"),
    (["--compile", "--cache", "dynamic", "--method", "sa", "--receivers", "2"], "--compile needs a static cache"),
    (["--cache", "static", "--prefill-batch", "1", "--method", "sa", "--receivers", "2"], "real prefill"),
    (["--cache", "paged", "--method", "sa", "--receivers", "2"], "--cache must be"),
    (["--compile", "--warmup", "0", "--method", "sa", "--receivers", "2"], "--warmup of at least 1"),
    ([], "Give a variant"),
    (["--artifact", "/nonexistent"], "not an attnshare artifact"),
])
def test_bench_cli_bad_input_is_one_sentence(tiny_folder, capsys, argv, message):
    assert main(["bench", "--model", str(tiny_folder), "--device", "cpu", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err


def test_synthetic_context_builds_the_same_cache_shapes(arch):
    base = tiny_model(arch)
    scenario = Scenario("t", batch=2, context=40, new_tokens=2)
    config = BenchConfig(repeats=1, warmup=0, device="cpu", synthetic_context=8, prefill_batch=1, progress=False)
    synthetic = run_bench([base_variant(base)], scenario, config).variants[0]
    real = run_bench([base_variant(base)], scenario, BenchConfig(repeats=1, warmup=0, device="cpu", progress=False))
    assert synthetic.kv_bytes == real.variants[0].kv_bytes


def test_keeping_freed_memory_is_glibc_tuning_and_hides_cpu_peaks(monkeypatch):
    """The CLI's allocator setting succeeds on glibc; once the process keeps freed memory, a CPU peak read off the
    resident set would miss the temporaries, so none is reported."""
    import platform

    from attnshare import allocator
    from attnshare.bench.memory import PeakMemory

    assert allocator.keep_freed_memory() == (platform.libc_ver()[0] == "glibc") == allocator.tuned()
    monkeypatch.setitem(allocator._STATE, "tuned", True)
    with PeakMemory("cpu") as peak:
        torch.ones(1 << 20)
    assert peak.peak_bytes is None
