"""LiSA: identity at init (= aligned direct sharing), blockwise prefill, the layer formula, sizes, training, bad input.

Neutral plan, cache parity, beams, padding, exact savings, artifacts and unapply: tests/test_contract.py.

Run as a script (``python tests/test_lisa.py OUT BATCH``) it is the worker of the 2-process training test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_worker, tiny_config, tiny_model
from helpers import greedy_generate, greedy_no_cache, logits, random_ids

import attnshare
from attnshare.errors import AttnshareError
from attnshare.memory import cache_bytes
from attnshare.methods.lisa import LiSAConfig, LiSAPlan, default_rank
from attnshare.methods.sa import SAPlan

MAPS = {1: [1, 0, 3, 2], 2: [2, 3, 0, 1], 3: [3, 2, 1, 0], 5: [0, 2, 1, 3]}


def lisa_plan(layers=(2, 3, 5), **kw) -> LiSAPlan:
    kw.setdefault("rank", 4)
    return LiSAPlan(layers=list(layers), head_map={layer: MAPS[layer] for layer in layers}, **kw)


def uniform_model(arch: str, num_layers: int = 6):
    """A tiny model whose layers are all of one window kind (Gemma3 otherwise alternates sliding/full)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, num_layers)
    if arch == "gemma3_text":
        config.layer_types = ["full_attention"] * num_layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def perturb(model, scale: float = 0.3, seed: int = 0) -> None:
    """Move every LiSA parameter away from its initialisation (as training would)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lisa_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


# ------------------------------------------------------------------------------------------------ parity


def test_step0_equals_aligned_direct_sharing_exactly(arch):
    """LiSA at init == SA whose receivers read the chain's root donor through the composed head permutations."""
    model = attnshare.apply(uniform_model(arch), lisa_plan((2, 3, 5), fused_prefill=False))
    composed3 = [MAPS[2][MAPS[3][h]] for h in range(4)]  # layer 3 reads layer 2, which reads layer 1
    sa = SAPlan(donors={2: 1, 3: 1, 5: 4}, head_map={2: MAPS[2], 3: composed3, 5: MAPS[5]}, fused_prefill=False)
    reference = attnshare.apply(uniform_model(arch), sa)
    ids = random_ids(2, 20)
    assert torch.equal(logits(model, ids), logits(reference, ids))


def test_step0_with_probability_source_matches_aligned_sharing():
    model = attnshare.apply(uniform_model("llama"), lisa_plan((2, 3), source="probs"))
    sa = SAPlan(donors={2: 1, 3: 1}, head_map={2: MAPS[2], 3: [MAPS[2][MAPS[3][h]] for h in range(4)]})
    ids = random_ids(2, 20)
    torch.testing.assert_close(logits(model, ids), logits(attnshare.apply(uniform_model("llama"), sa), ids),
                               rtol=1e-4, atol=1e-5)


def use_blocks(model, rows: int) -> None:
    """Query blocks of ``rows`` in gradient-free prefill (0: whole maps, donors materialise their scores)."""
    from attnshare.attention.dispatch import Publisher
    from attnshare.methods.lisa.modules import LiSAAttention

    for module in model.modules():
        if isinstance(module, LiSAAttention):
            module.block_rows = rows
        if isinstance(getattr(module, "attnshare_hook", None), Publisher):
            module.attnshare_hook.fused_prefill = rows > 0


def blocked_and_whole(model, rows: int, call):
    """``call(model)`` under no_grad with blocks of ``rows`` and with whole maps."""
    with torch.no_grad():
        use_blocks(model, rows)
        blocked = call(model)
        use_blocks(model, 0)
        whole = call(model)
    return blocked, whole


@pytest.mark.parametrize("source", ["scores", "probs"])
def test_blockwise_prefill_equals_whole_maps(arch, source):
    """Blocks of 4 query rows (19 rows: a ragged last block) over a chain of LiSA layers give the whole-map
    logits; Gemma3's sliding-window layers bring real masks into the blocks."""
    model = attnshare.apply(tiny_model(arch, num_layers=6), lisa_plan((1, 2, 3, 5), source=source))
    perturb(model)
    ids = random_ids(2, 19, seed=4)
    blocked, whole = blocked_and_whole(model, 4, lambda m: m(ids, use_cache=False).logits)
    # float32 sums in another order: 1e-5 holds on most architectures, OLMo-2's projection-wide q/k norms reach 1.4e-5
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=3e-5)


@pytest.mark.parametrize("width", [0, 2])
def test_fused_head_ffn_kernel_equals_the_eager_gemms(width, monkeypatch, caplog):
    """The head FFN as per-channel sums, eager and compiled (the kernel of eager prefill blocks), equals the
    batched GEMMs, masked donor entries included; where compiling fails the GEMMs run, after one warning."""
    from attnshare.methods.lisa import kernels
    from attnshare.methods.lisa.modules import HeadAligner

    aligner = HeadAligner([2, 0, 3, 1], width, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in aligner.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(2))
    z[..., 0, 3:] = float("-inf")  # masked entries, as a donor with a real mask publishes them
    mlp = (aligner.up, aligner.up_bias, aligner.down) if width else (None, None, None)
    with torch.no_grad():
        want = aligner(z, fill=True)
        assert torch.isfinite(want).all()
        torch.testing.assert_close(kernels.unrolled_head_ffn(z, aligner.skip, *mlp, True), want)
        torch.testing.assert_close(aligner(z, fill=True, fused=True), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(aligner(z[..., 1:, :3], fused=True), aligner(z[..., 1:, :3]), rtol=1e-5, atol=1e-6)

        def broken(*args):
            raise RuntimeError("no C++ compiler\ndetails")

        monkeypatch.setattr(kernels, "_compiled", lambda: broken)
        monkeypatch.setitem(kernels._STATE, "enabled", True)
        with caplog.at_level("WARNING", logger=kernels.__name__):
            assert torch.equal(aligner(z, fill=True, fused=True), want)
            assert torch.equal(aligner(z, fill=True, fused=True), want)
    assert [r.getMessage() for r in caplog.records if r.name == kernels.__name__] == [
        ("LiSA's fused head-FFN kernel is unavailable here (RuntimeError: no C++ compiler); prefill runs the eager "
         "GEMMs.")]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_fast_path_prefill_blocks_run_the_fused_kernel_and_equal_whole_maps(arch, monkeypatch):
    """On the fast path (bench/generate --compile) eager prefill blocks run the compiled head-FFN kernel: the same
    logits as whole maps; a plain forward never runs it."""
    from attnshare.methods.lisa import modules
    from attnshare.sharing.apply import use_fast_path

    model = attnshare.apply(tiny_model(arch, num_layers=6), lisa_plan((1, 2, 3, 5)))
    perturb(model)
    ids = random_ids(2, 19, seed=4)
    calls = []
    real = modules.head_ffn

    def counted(*args):
        out = real(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(modules, "head_ffn", counted)
    blocked_and_whole(model, 4, lambda m: m(ids, use_cache=False).logits)
    assert calls == []  # off the fast path: the eager GEMMs
    use_fast_path(model)
    blocked, whole = blocked_and_whole(model, 4, lambda m: m(ids, use_cache=False).logits)
    assert calls and all(calls)
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=3e-5)


def test_block_rows_shrink_with_batch_and_keys_so_block_temporaries_stay_bounded(monkeypatch):
    """Query rows per block keep B x H x rows x keys within BLOCK_ENTRIES (the real model: 128 rows at batch 1 and
    2,048 keys, 32 at batch 4, never below MIN_BLOCK_ROWS), and the smaller blocks of a larger batch give the
    whole-map logits."""
    from attnshare.methods.lisa import modules

    model = attnshare.apply(tiny_model("llama", num_layers=6), lisa_plan((1, 2, 3, 5)))
    perturb(model)
    layer = next(m for m in model.modules() if isinstance(m, modules.LiSAAttention))
    heads = layer.num_heads
    layer.block_rows = 128
    monkeypatch.setattr(modules, "BLOCK_ENTRIES", 128 * heads * 2048)
    assert [layer.rows_per_block(b, 2048) for b in (1, 2, 4, 64)] == [128, 64, 32, modules.MIN_BLOCK_ROWS]
    assert layer.rows_per_block(1, 512) == 128 and layer.rows_per_block(4, 512) == 128
    layer.block_rows = 0
    assert layer.rows_per_block(4, 2048) == 0  # whole maps stay whole maps
    monkeypatch.setattr(modules, "BLOCK_ENTRIES", 4 * heads * 20)  # batch 1: 4 rows of 20 keys; batch 3: at least 1
    monkeypatch.setattr(modules, "MIN_BLOCK_ROWS", 1)
    ids = random_ids(3, 20, seed=5)
    sizes = []
    monkeypatch.setattr(modules.LiSAAttention, "blocked_attention", record_steps(sizes))
    blocked, whole = blocked_and_whole(model, 8, lambda m: m(ids, use_cache=False).logits)
    assert sizes and set(sizes) == {1}  # 4 * H * 20 entries // (3 * H * 20) = 1 row per block at batch 3
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=3e-5)


def record_steps(sizes: list):
    """A ``blocked_attention`` that records each call's rows per block, then runs the real one."""
    from attnshare.methods.lisa.modules import LiSAAttention

    real = LiSAAttention.blocked_attention

    def blocked_attention(self, donor, q, k, v, mask):
        sizes.append(self.rows_per_block(q.shape[0], k.shape[-2]))
        return real(self, donor, q, k, v, mask)

    return blocked_attention


def test_blockwise_prefill_after_a_cached_prefix_and_with_padding():
    """A second prompt chunk over a cached prefix (keys > queries) and a left-padded batch (a tensor mask)."""
    from transformers import DynamicCache

    model = attnshare.apply(tiny_model("llama", num_layers=6), lisa_plan((1, 2, 3, 5)))
    perturb(model)
    ids = random_ids(2, 21, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0

    def chunked(m):
        cache = DynamicCache()
        m(ids[:, :8], attention_mask=mask[:, :8], past_key_values=cache, use_cache=True)
        return m(ids[:, 8:], attention_mask=mask, past_key_values=cache, use_cache=True).logits

    blocked, whole = blocked_and_whole(model, 4, chunked)
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-5)


def test_blockwise_lisa_donor_feeds_an_sa_receiver():
    """An SA receiver whose donor is a LiSA layer reads the blocks assembled into whole maps."""
    model = attnshare.apply(tiny_model("llama", num_layers=6), lisa_plan((2, 3)))
    perturb(model)
    model = attnshare.apply(model, SAPlan(donors={4: 3}))
    ids = random_ids(2, 19, seed=6)
    blocked, whole = blocked_and_whole(model, 4, lambda m: m(ids, use_cache=False).logits)
    # float32 sums in another order: 1e-5 holds on most architectures, OLMo-2's projection-wide q/k norms reach 1.4e-5
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=3e-5)


def test_one_layer_formula_with_score_source():
    """Reference check of one LiSA layer: softmax(g(S_donor) + q_lr k_lr^T / sqrt(r) + mask) V o_proj by hand."""
    import math

    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from attnshare.attention.functional import repeat_kv

    base = tiny_model("llama")
    model = attnshare.apply(tiny_model("llama"), lisa_plan((3,), rope=False))
    perturb(model)
    captured = {}
    hooks = [
        base.model.layers[layer].self_attn.register_forward_pre_hook(
            lambda m, a, kw, layer=layer: captured.__setitem__(layer, kw), with_kwargs=True) for layer in (2, 3)
    ]
    ids = random_ids(1, 12)
    t = ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    with torch.no_grad():
        base(ids, use_cache=False)
        for h in hooks:
            h.remove()
        donor, x = base.model.layers[2].self_attn, captured[3]["hidden_states"]
        xd, (cos, sin) = captured[2]["hidden_states"], captured[2]["position_embeddings"]
        qd = donor.q_proj(xd).view(1, t, 4, 16).transpose(1, 2)
        kd = donor.k_proj(xd).view(1, t, 2, 16).transpose(1, 2)
        qd, kd = apply_rotary_pos_emb(qd, kd, cos, sin)
        z = torch.where(causal, qd @ repeat_kv(kd, 2).transpose(-1, -2) * donor.scaling, 0.0)  # (1,H,T,T)
        lisa = model.model.layers[3].self_attn
        g = lisa.lisa_align
        z = torch.einsum("gh,bhts->bgts", g.skip, z) + torch.einsum(
            "hm,bmts->bhts", g.down, F.gelu(torch.einsum("mh,bhts->bmts", g.up, z) + g.up_bias[:, None, None]))
        q = lisa.lisa_q(x).view(1, t, 4, 4).transpose(1, 2)
        k = repeat_kv(lisa.lisa_k(x).view(1, t, 2, 4).transpose(1, 2), 2)
        probs = torch.softmax((z + q @ k.transpose(-1, -2) / math.sqrt(4)).masked_fill(~causal, float("-inf")), -1)
        v = repeat_kv(lisa.v_proj(x).view(1, t, 2, 16).transpose(1, 2), 2)
        expected = lisa.o_proj((probs @ v).transpose(1, 2).reshape(1, t, -1))
        got = {}
        lisa.register_forward_hook(lambda m, a, o: got.__setitem__("o", o[0]))
        model(ids, use_cache=False)
    torch.testing.assert_close(got["o"], expected, rtol=1e-4, atol=1e-5)


def test_one_layer_formula_with_probability_source():
    """With Z = probabilities the formula above is exact: g(P) in log space plus the low-rank term."""
    import math

    import torch.nn.functional as F

    from attnshare.attention.functional import repeat_kv

    base = tiny_model("llama", attn_implementation="eager")
    model = attnshare.apply(tiny_model("llama"), lisa_plan((3,), rope=False, source="probs"))
    with torch.no_grad():  # keep the FFN output positive so the log stays finite: skip path + small MLP
        lisa = model.model.layers[3].self_attn
        lisa.lisa_align.down.normal_(0, 1e-3, generator=torch.Generator().manual_seed(1))
        lisa.lisa_k.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    captured = {}
    hooks = [
        base.model.layers[2].self_attn.register_forward_hook(lambda m, a, o: captured.__setitem__("p", o[1])),
        base.model.layers[3].self_attn.register_forward_pre_hook(
            lambda m, a, kw: captured.__setitem__("x", kw["hidden_states"]), with_kwargs=True),
    ]
    ids = random_ids(1, 12)
    with torch.no_grad():
        base(ids, use_cache=False, output_attentions=True)
        for h in hooks:
            h.remove()
        x, t, g = captured["x"], ids.shape[1], lisa.lisa_align
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        p = captured["p"]
        a = torch.einsum("gh,bhts->bgts", g.skip, p) + torch.einsum(
            "hm,bmts->bhts", g.down, F.gelu(torch.einsum("mh,bhts->bmts", g.up, p) + g.up_bias[:, None, None]))
        q = lisa.lisa_q(x).view(1, t, 4, 4).transpose(1, 2)
        k = repeat_kv(lisa.lisa_k(x).view(1, t, 2, 4).transpose(1, 2), 2)
        s = a.clamp_min(1e-30).log() + q @ k.transpose(-1, -2) / math.sqrt(4)
        probs = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        v = repeat_kv(lisa.v_proj(x).view(1, t, 2, 16).transpose(1, 2), 2)
        expected = lisa.o_proj((probs @ v).transpose(1, 2).reshape(1, t, -1))
        got = {}
        lisa.register_forward_hook(lambda m, a, o: got.__setitem__("o", o[0]))
        model(ids, use_cache=False)
    torch.testing.assert_close(got["o"], expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- savings


def test_default_rank_makes_qk_about_six_times_smaller():
    assert default_rank(64) == 10 and default_rank(128) == 20 and default_rank(16) == 2
    d, h, hkv, dim = 576, 9, 3, 64  # SmolLM2-135M
    original = d * (h + hkv) * dim
    lisa = d * (h + hkv) * default_rank(dim) + h * h + 2 * h * (2 * h + 1)
    assert original / lisa >= 6


def test_size_report_is_exact():
    from attnshare.methods.lisa.report import lisa_quantities

    model = attnshare.apply(tiny_model("llama"), lisa_plan((2, 3), rank=4, ffn_width=2))
    q = lisa_quantities(model, probe_tokens=8)
    assert q["qk_params_per_layer_original"] == 64 * 6 * 16
    assert q["qk_params_per_layer_lisa"] == 64 * 6 * 4 + 16 + 8 * 9
    assert q["kv_ratio"] == (2 * 4 * 16 - 2 * (16 - 4)) / (2 * 4 * 16)


# --------------------------------------------------------------------------------------------- artifacts


def test_plan_json_round_trip(tmp_path):
    plan = lisa_plan((2, 3), rank=6, ffn_width=0, source="probs", rope=False)
    attnshare.save_plans(plan, tmp_path / "p.json")
    assert attnshare.load_plans(tmp_path / "p.json") == [plan]


# ------------------------------------------------------------------------------------------ fitted start


def fitted(model, layers=(2, 3), rank=4, **kw):
    return attnshare.methods.get_method("lisa").make_plan(
        model, LiSAConfig(layers=list(layers), rank=rank, init="fit", **kw))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "granite"])
def test_fitted_start_with_every_frequency_is_the_layer_itself(arch):
    """With r = d every rotary frequency is kept: the low-rank term is the layer's own scores, so the fit gives
    gain 1 to each frequency, leaves the donor out, and the model is the base one (up to the ridge)."""
    base = uniform_model(arch)
    plan = fitted(base, rank=16)
    for fit in plan.fits.values():
        assert fit.frequencies == list(range(8))
        torch.testing.assert_close(torch.tensor(fit.gains), torch.ones(4, 8), atol=2e-2, rtol=0)
    ids = random_ids(2, 20)
    expected = logits(base, ids)
    torch.testing.assert_close(logits(attnshare.apply(base, plan), ids), expected, atol=2e-2, rtol=0)


def test_fitted_start_beats_aligned_sharing(arch):
    """At r = 4 the fitted start is closer to the base than LiSA's aligned-sharing start, on every family (q/k
    norms included: their weight and mean 1/rms are folded into the low-rank rows)."""
    from helpers import teacher_kl

    ids = random_ids(2, 48, seed=3)
    teacher = uniform_model(arch)
    kls = {}
    for init in ("permutation", "fit"):
        config = LiSAConfig(layers=[2, 3], rank=4, init=init)
        plan = attnshare.methods.get_method("lisa").make_plan(uniform_model(arch), config)
        kls[init] = teacher_kl(attnshare.apply(uniform_model(arch), plan), teacher, ids)
    assert kls["fit"] < 0.7 * kls["permutation"], kls


def test_head_fit_recovers_a_planted_mixing_and_its_frequencies():
    """Synthetic target = W z + sum_f g_f share_f on two of six frequencies: the greedy choice finds them and the
    solve returns W and g."""
    from attnshare.methods.lisa.fit import HeadFit

    gen = torch.Generator().manual_seed(0)
    h, f, t = 3, 6, 24
    z = torch.randn(1, h, t, t, generator=gen)
    shares = torch.randn(h, f, t, t, generator=gen)
    mixing = torch.randn(h, h, generator=gen)
    gains = torch.tensor([[1.5, -0.5], [0.7, 2.0], [1.0, 1.0]])
    target = torch.einsum("gh,bhts->bgts", mixing, z) + torch.einsum("hf,hfts->hts", gains, shares[:, [1, 4]])[None]
    probs = torch.softmax(torch.randn(1, h, t, t, generator=gen), -1)
    fit = HeadFit(h, f)
    fit.add(z, shares, target, probs)
    kept = fit.select(2, torch.eye(h), ridge=1e-9)
    assert kept == [1, 4]
    got_mixing, got_gains = fit.solve(kept, torch.eye(h), ridge=1e-9)
    torch.testing.assert_close(got_mixing, mixing, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_gains, gains, atol=1e-4, rtol=0)
    assert fit.residual(kept, torch.eye(h), ridge=1e-9) < 1e-6 * fit.total.sum().item()


def test_fitted_plan_round_trips_and_rebuilds_the_same_model(tmp_path):
    """The plan holds the fit (frequencies, mixing, gains), so applying its JSON gives the same model: no data is
    read at apply or load time."""
    plan = fitted(tiny_model("llama"))
    assert plan.init == "fit" and sorted(plan.fits) == [2, 3] and "fitted start" in plan.summary()
    attnshare.save_plans(plan, tmp_path / "p.json")
    again = attnshare.load_plans(tmp_path / "p.json")[0]
    assert again == plan
    ids = random_ids(2, 20)
    torch.testing.assert_close(logits(attnshare.apply(tiny_model("llama"), again), ids),
                               logits(attnshare.apply(tiny_model("llama"), plan), ids), rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: setattr(p, "init", "permutation"), "holds fitted starts but its init is 'permutation'"),
        (lambda p: setattr(p, "init", "magic"), "init must be one of"),
        (lambda p: p.fits.pop(3), "needs a fitted start for every LiSA layer"),
        (lambda p: setattr(p.fits[2], "frequencies", [0, 1, 2]), "must keep 2 of at most 8 rotary frequencies"),
        (lambda p: setattr(p.fits[2], "gains", [[1.0]] * 4), "gains of layer 2 must be 4 x 2"),
        (lambda p: setattr(p.fits[2], "mixing", [[1.0]]), "head mixing of layer 2 must be 4 x 4"),
        (lambda p: setattr(p, "source", "probs"), "needs --source scores and RoPE"),
    ],
)
def test_bad_fitted_plans_are_refused_before_any_change(change, message):
    plan = fitted(tiny_model("llama"))
    change(plan)
    model = tiny_model("llama")
    with pytest.raises(AttnshareError, match=message):
        attnshare.apply(model, plan)
    assert not hasattr(model, "attnshare_state")


def test_fit_init_needs_score_source_and_rope():
    with pytest.raises(AttnshareError, match="add --init permutation to use --source probs"):
        LiSAConfig(source="probs")
    with pytest.raises(AttnshareError, match="add --init permutation"):
        LiSAConfig(init="fit", rope=False)
    assert LiSAConfig(source="probs", init="permutation").init == "permutation"


# ---------------------------------------------------------------------------------------------- training


def _train_config(**kw):
    from attnshare.training import TrainConfig

    return TrainConfig(**{"seq_len": 16, "batch_size": 4, "max_steps": 6, "lr": 1e-2, "progress": False, **kw})


def _kl(model, teacher, ids) -> float:
    s, t = logits(model, ids).log_softmax(-1), logits(teacher, ids).log_softmax(-1)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean").item()


@pytest.mark.parametrize("attention_kl_weight", [0.0, 1.0])
def test_training_moves_only_lisa_parameters_and_lowers_kl(attention_kl_weight, tmp_path):
    from attnshare.methods.lisa.training import lisa_objective
    from attnshare.training import train_shared

    teacher = tiny_model("llama", seed=1)  # another model, so there is a real gap to distil
    model = attnshare.apply(tiny_model("llama"), lisa_plan((2, 3)))
    before = {n: p.clone() for n, p in model.named_parameters()}
    data = random_ids(1, 16 * 4, seed=3).view(-1)  # one global batch: every step sees the same 4 blocks
    ids = data.view(4, 16)
    kl_before = _kl(model, teacher, ids)
    objective = lisa_objective(model, teacher, [2, 3], attention_weight=attention_kl_weight)
    result = train_shared(model, None, _train_config(max_steps=15, lr=1e-3, attention_kl_weight=attention_kl_weight),
                          teacher=teacher, objective=objective, data=data)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lisa_" in n for n in changed)
    assert result.losses[-1][1] < result.losses[0][1]
    if not attention_kl_weight:
        assert _kl(model, teacher, ids) < kl_before
    assert ("attn_kl" in result.metrics) == (attention_kl_weight > 0)
    attnshare.save(model, tmp_path / "trained")
    loaded, _ = attnshare.load(tmp_path / "trained", model=tiny_model("llama"))
    assert torch.equal(logits(loaded, ids), logits(model, ids))


class CharTokenizer:
    """Stand-in tokenizer for tiny models: one id per character."""

    def __call__(self, text: str, **_) -> dict:
        return {"input_ids": [ord(c) % 128 for c in text]}


def test_fit_through_public_train_and_exact_resume(tmp_path, monkeypatch):
    """attnshare.train runs LiSA's fit; a run killed after step 3 and resumed gives the uninterrupted curve."""
    from attnshare.methods.lisa import method as lisa_method

    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 12)
    teacher = tiny_model("llama")
    whole = tiny_model("llama")
    full = attnshare.train(whole, CharTokenizer(), lisa_plan((2, 3)), _train_config(text=str(text)), teacher=teacher)
    assert full.steps == 6 and whole.attnshare_state.trained

    real_objective = lisa_method.lisa_objective

    def dying_objective(*args, **kw):  # the process "dies" inside step 4, after the step-3 checkpoint
        inner, calls = real_objective(*args, **kw), []

        def objective(model, batch, teacher):
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
            return inner(model, batch, teacher)

        return objective

    config = _train_config(text=str(text), out_dir=str(tmp_path / "ck"), checkpoint_every=3)
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(lisa_method, "lisa_objective", dying_objective)
        attnshare.train(tiny_model("llama"), CharTokenizer(), lisa_plan((2, 3)), config, teacher=teacher)
    config.resume = True
    resumed = attnshare.train(tiny_model("llama"), CharTokenizer(), lisa_plan((2, 3)), config, teacher=teacher)
    assert [x[1] for x in resumed.losses] == pytest.approx([x[1] for x in full.losses], abs=1e-6)


def test_layer_local_stage_fits_teacher_maps_then_end_to_end(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Now is the winter of our discontent made glorious summer. " * 10)
    teacher = tiny_model("llama", seed=1)
    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    plan = lisa_plan((2, 3), local_steps=12)
    result = attnshare.train(model, CharTokenizer(), plan, _train_config(text=str(text), max_steps=2, lr=3e-3),
                             teacher=teacher)
    assert result.metrics["local_steps"] == 12 and result.metrics["local_last"] < result.metrics["local_first"]
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert not changed  # base weights untouched (LiSA parameters are new)
    assert teacher.config._attn_implementation == "sdpa" and not hasattr(teacher.model.layers[1].self_attn,
                                                                           "attnshare_hook")


def test_resume_from_checkpoint_of_another_plan_is_refused(tmp_path):
    from attnshare.training import train_shared

    teacher = tiny_model("llama")
    data = random_ids(1, 16 * 16, seed=5).view(-1)
    model = attnshare.apply(tiny_model("llama"), lisa_plan((2, 3)))
    train_shared(model, None, _train_config(max_steps=2, out_dir=str(tmp_path / "ck")), teacher=teacher, data=data)
    other = attnshare.apply(tiny_model("llama"), lisa_plan((3,)))
    with pytest.raises(AttnshareError, match="other|another"):
        train_shared(other, None, _train_config(max_steps=4, out_dir=str(tmp_path / "ck"), resume=True),
                     teacher=teacher, data=data)


def test_two_processes_match_one(tmp_path):
    """2 gloo CPU processes with batch 2 each == 1 process with batch 4 (this file run as a worker)."""
    worker = Path(__file__).resolve()
    run_worker(worker, str(tmp_path / "two"), "2", processes=2)
    run_worker(worker, str(tmp_path / "one"), "4")
    two, one = (json.loads((tmp_path / k / "result.json").read_text()) for k in ("two", "one"))
    assert (two["world"], one["world"]) == (2, 1)
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    for key, value in one["params"].items():
        assert two["params"][key] == pytest.approx(value, abs=1e-5)


def _worker(out: Path, batch_size: int) -> None:
    from accelerate import PartialState

    from attnshare.methods.lisa.training import lisa_objective
    from attnshare.training import train_shared

    torch.set_num_threads(1)
    teacher = tiny_model("llama", num_layers=3)
    model = attnshare.apply(tiny_model("llama", num_layers=3), lisa_plan((1, 2)))
    data = random_ids(1, 32 * 16, seed=6).view(-1)
    result = train_shared(model, None, _train_config(batch_size=batch_size, max_steps=3, seed=2), teacher=teacher,
                          objective=lisa_objective(model, teacher, [1, 2], attention_weight=0.5), data=data)
    state = PartialState()
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        params = {n: p.detach().sum().item() for n, p in model.named_parameters() if ".lisa_" in n}
        (out / "result.json").write_text(json.dumps(
            {"losses": [x[1] for x in result.losses], "world": state.num_processes, "params": params}))
    state.wait_for_everyone()


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.2])
def test_fraction_out_of_range_is_refused(fraction):
    with pytest.raises(AttnshareError, match="--fraction must be between 0 and 1"):
        LiSAConfig(fraction=fraction)


def test_training_text_too_short_is_refused():
    from attnshare.training import train_shared

    model = attnshare.apply(tiny_model("llama"), lisa_plan((2,)))
    with pytest.raises(AttnshareError, match="fewer than one"):
        train_shared(model, None, _train_config(), teacher=tiny_model("llama"), data=random_ids(1, 40).view(-1))


@pytest.mark.parametrize(
    "plan, message",
    [
        (LiSAPlan(layers=[0, 2]), "Layer 0 has no previous layer"),
        (LiSAPlan(layers=[2, 9]), "layers 0..3"),
        (LiSAPlan(layers=[2], rank=5), "needs an even rank"),
        (LiSAPlan(layers=[2], rank=99), "between 1 and the head dim"),
        (LiSAPlan(layers=[2], head_map={3: [0, 1, 2, 3]}), "not a LiSA layer"),
        (LiSAPlan(layers=[2], source="logits"), "must be one of"),
    ],
)
def test_bad_plans_are_refused_before_any_change(plan, message):
    model = tiny_model("llama")
    with pytest.raises(AttnshareError, match=message):
        attnshare.apply(model, plan)
    assert not hasattr(model, "attnshare_state") and model.config._attn_implementation == "sdpa"


def test_make_plan_with_explicit_layers():
    model = tiny_model("llama", num_layers=6)
    plan = attnshare.methods.get_method("lisa").make_plan(model, LiSAConfig(layers=[3, 4, 5], rank=4))
    assert plan.layers == [3, 4, 5] and plan.rank == 4 and sorted(plan.head_map) == [3, 4, 5]
    assert all(sorted(m) == [0, 1, 2, 3] for m in plan.head_map.values())  # permutations


def test_make_plan_by_fraction_keeps_layer_zero_standard():
    model = tiny_model("llama", num_layers=6)
    plan = attnshare.methods.get_method("lisa").make_plan(model, LiSAConfig(fraction=0.5))
    assert len(plan.layers) == 3 and 0 not in plan.layers and sorted(plan.head_map) == plan.layers


def test_make_plan_measures_on_its_calibration_settings_once(monkeypatch):
    """The layer choice, head maps and fitted start read the config's calibration flags (as every planner does),
    and the head maps come from the sensitivity probe: one attention-statistics pass in all."""
    import attnshare.methods.lisa.method as lisa_method
    import attnshare.methods.sa.planner as sa_planner
    from attnshare.analysis import heads, sensitivity

    seen: dict[str, list] = {"stats": [], "heldout": [], "fit": []}
    real_stats, real_blocks, real_fit = heads.head_similarity, sensitivity.calibration_blocks, lisa_method.fit_layers

    def stats(model, pairs, **kw):
        seen["stats"].append((kw["tokens"], kw["seq_len"]))
        return real_stats(model, pairs, **kw)

    def blocks(model, text, tokens, seq_len, **kw):
        seen["heldout"].append((text, tokens, seq_len, kw.get("offset")))
        return real_blocks(model, text, tokens, seq_len, **kw)

    def fit(*args, **kw):
        seen["fit"].append((kw["text"], kw["tokens"], kw["seq_len"]))
        return real_fit(*args, **kw)

    monkeypatch.setattr(heads, "head_similarity", stats)
    monkeypatch.setattr(sa_planner, "head_similarity", stats)
    monkeypatch.setattr(sensitivity, "calibration_blocks", blocks)
    monkeypatch.setattr(lisa_method, "fit_layers", fit)
    config = LiSAConfig(fraction=0.5, rank=4, calib_text="plays", calib_tokens=64, calib_seq_len=32,
                        heldout_tokens=48)
    plan = attnshare.methods.get_method("lisa").make_plan(tiny_model("llama", num_layers=6), config)
    assert len(plan.layers) == 3 and sorted(plan.head_map) == plan.layers
    assert seen == {"stats": [(64, 32)], "heldout": [("plays", 48, 32, 64)], "fit": [("plays", 64, 32)]}


# ----------------------------------------------------------------------------------------------- real model


@pytest.mark.real
def test_real_model_lisa_layers(real_model):
    import copy

    model, tok = real_model
    layers = list(range(14, 30))  # 16 of 30 layers
    plan = LiSAPlan(layers=layers, rank=default_rank(64))
    shared = attnshare.apply(copy.deepcopy(model), plan)
    perturb(shared, scale=0.01)
    ids = tok(["The plays of Shakespeare were first collected", "In the year 1590 the"], return_tensors="pt",
              padding=True).input_ids
    assert torch.equal(greedy_generate(shared, ids, 8), greedy_no_cache(shared, ids, 8))
    attn = model.model.layers[14].self_attn
    original_qk = attn.q_proj.weight.numel() + attn.k_proj.weight.numel()
    lisa_qk = sum(p.numel() for n, p in shared.model.layers[14].self_attn.named_parameters() if "lisa_" in n)
    assert original_qk / lisa_qk >= 6
    with torch.no_grad():
        base_kv = cache_bytes(model(ids, use_cache=True).past_key_values)
        lisa_kv = cache_bytes(shared(ids, use_cache=True).past_key_values)
    # each LiSA layer keeps k of width r instead of d: (2*30*64 - 16*(64-10)) / (2*30*64) of the bytes
    assert lisa_kv * 2 * 30 * 64 == base_kv * (2 * 30 * 64 - 16 * (64 - default_rank(64)))



def test_real_model_blockwise_prefill_equals_whole_maps(real_model):
    """SmolLM2 with the headline plan's layers: a 300-token prefill in blocks of 128 rows gives the whole-map
    logits (the evaluation and benchmark path equals the training path)."""
    import copy

    model, _ = real_model
    plan = LiSAPlan(layers=[4, 5, 6, 9, 13, 15, 19, *range(21, 30)], rank=default_rank(64))
    shared = attnshare.apply(copy.deepcopy(model), plan)
    perturb(shared, scale=0.01)
    ids = random_ids(1, 300, vocab=40000, seed=7)
    blocked, whole = blocked_and_whole(shared, 128, lambda m: m(ids, use_cache=True).logits)
    torch.testing.assert_close(blocked, whole, rtol=1e-4, atol=1e-4)

if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]))
