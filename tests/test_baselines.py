"""The removal baselines (drop, layerdrop), the mix planner and `attnshare compare` (equal-savings tables).

Exact quantities only: layer counts from budgets, savings read off the cache and the parameter count, nested
greedy curves, and the same-layers comparison naming exactly SA's receivers.
"""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch
from conftest import tiny_model
from helpers import random_ids, teacher_kl
from test_cli import tiny_folder  # noqa: F401  (fixture)

import attnshare
from attnshare.arch import attention_parameters, decoder_layers, qk_parameters
from attnshare.cli import main
from attnshare.errors import AttnshareError
from attnshare.methods.drop import DropConfig, DropPlan
from attnshare.methods.drop.planner import block_influence
from attnshare.methods.layerdrop import LayerDropConfig, LayerDropPlan
from attnshare.methods.mix import MixConfig, MixPlan
from attnshare.methods.mix.planner import plan_mix_curve
from attnshare.methods.sa import SAPlan
from attnshare.report import compare as compare_module
from attnshare.report.compare import CompareConfig
from attnshare.report.variants import kv_bytes_per_token
from attnshare.training import TrainConfig, train_shared

SMALL = {"calib_tokens": 64, "calib_seq_len": 32, "heldout_tokens": 32, "shortlist": 0}


def test_drop_budgets_in_layers_kv_and_parameters():
    model = tiny_model("llama", num_layers=6)
    drop = attnshare.get_method("drop")
    assert len(drop.make_plan(model, DropConfig(budget=2, **SMALL)).layers) == 2
    assert len(drop.make_plan(model, DropConfig(kv_saving=0.3, **SMALL)).layers) == 2  # ceil(0.3 * 6)
    per_layer = attention_parameters(model, 0)
    fraction = 2.5 * per_layer / model.num_parameters()  # needs 3 layers
    plan = drop.make_plan(model, DropConfig(param_saving=fraction, **SMALL))
    assert len(plan.layers) == 3
    shared = attnshare.apply(tiny_model("llama", num_layers=6), plan)
    assert model.num_parameters() - shared.num_parameters() == 3 * per_layer
    assert kv_bytes_per_token(shared) == pytest.approx(kv_bytes_per_token(model) * 3 / 6)


def test_drop_curve_is_nested_and_equals_separate_plans():
    model = tiny_model("qwen3", num_layers=6)
    configs = [DropConfig(budget=b, **SMALL) for b in (1, 2, 3)]
    curve = attnshare.get_method("drop").make_plans(model, configs)
    assert set(curve[0].layers) <= set(curve[1].layers) <= set(curve[2].layers)
    for config, plan in zip(configs, curve):
        assert plan.to_dict() == attnshare.get_method("drop").make_plan(model, config).to_dict()


def test_layerdrop_by_block_influence_picks_the_least_influential_blocks():
    model = tiny_model("llama", num_layers=6)
    from attnshare.analysis.collect import calibration_blocks

    blocks = calibration_blocks(model, "plays", 64, 32)
    scores = block_influence(model, blocks, "block")
    assert len(scores) == 6 and all(0 <= s <= 2 for s in scores)
    plan = attnshare.get_method("layerdrop").make_plan(model, LayerDropConfig(budget=2, score="influence", **SMALL))
    assert plan.layers == sorted(sorted(range(6), key=lambda i: (scores[i], i))[:2])
    shared = attnshare.apply(tiny_model("llama", num_layers=6), plan)
    block = sum(p.numel() for p in decoder_layers(model)[0].parameters())
    assert model.num_parameters() - shared.num_parameters() == 2 * block


def test_mix_meets_kv_budgets_exactly_along_one_greedy_path():
    model = tiny_model("llama", num_layers=6)
    config = MixConfig(kv_saving=0.5, **SMALL)
    plans = plan_mix_curve(model, config, [2, 4, 6], progress=False)  # in half-layers of the KV cache (2L = 12)
    for plan, units in zip(plans, (2, 4, 6)):
        assert 2 * len(plan.drop) + len(plan.donors) == units
        assert not set(plan.donors.values()) & set(plan.drop)  # receivers never reuse a dropped layer
        shared = attnshare.apply(tiny_model("llama", num_layers=6), plan)
        assert kv_bytes_per_token(shared) == pytest.approx(kv_bytes_per_token(model) * (12 - units) / 12)


@pytest.mark.parametrize("kv_saving", [1 / 6, 1 / 3, 1 / 2])
def test_mix_is_never_worse_than_the_pure_plans_it_contains(kv_saving):
    """At every KV budget mix's plan measures no more KL on the calibration tokens than drop's and SA's own
    planners at the same saving (on 6 layers every layer stays in the running, so their greedy paths are mix's)."""
    from attnshare.methods.sa import SAConfig
    from attnshare.methods.sa.planner import PlanProbe

    model = tiny_model("llama", num_layers=6)
    probe = PlanProbe(model, text="plays", tokens=64, seq_len=32, heldout=32, progress=False)
    mix = probe.measure(attnshare.get_method("mix").make_plan(model, MixConfig(kv_saving=kv_saving, **SMALL))).kl
    drop = probe.measure(attnshare.get_method("drop").make_plan(model, DropConfig(kv_saving=kv_saving, **SMALL))).kl
    assert mix <= drop + 1e-9
    receivers = round(kv_saving * 12)
    if receivers <= 5:  # SA alone reaches at most L-1 receivers
        sa = SAConfig(budget=receivers, align_heads=True, **SMALL)
        assert mix <= probe.measure(attnshare.get_method("sa").make_plan(model, sa)).kl + 1e-9


def test_mix_parameter_budget_is_met():
    model = tiny_model("qwen2", num_layers=6)
    target = 2 * qk_parameters(model, 1) / model.num_parameters()
    plan = attnshare.get_method("mix").make_plan(model, MixConfig(param_saving=target, **SMALL))
    shared = attnshare.apply(tiny_model("qwen2", num_layers=6), plan)
    assert model.num_parameters() - shared.num_parameters() >= 2 * qk_parameters(model, 1)


@pytest.mark.parametrize("plans, message", [
    ([MixPlan(drop=[1], donors={2: 1})], "which the mix plan drops"),
    ([MixPlan(drop=[2], donors={2: 1})], "both dropped and an SA receiver"),
    ([DropPlan(layers=[1]), SAPlan(donors={2: 1})], "computes no attention"),
    ([SAPlan(donors={2: 1}), DropPlan(layers=[1])], "already changed or reused"),
    ([DropPlan(layers=[1, 1])], "twice"),
    ([DropPlan(layers=[9])], "out of range"),
])
def test_bad_removal_plans_are_refused(plans, message):
    model = tiny_model("llama")
    with pytest.raises(AttnshareError, match=message):
        attnshare.apply(model, plans)


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 1, "kv_saving": 0.2}, "not --budget and --kv-saving"),
    ({"layers": [1, 1]}, "twice"),
    ({"kv_saving": 1.5}, "must lie in"),
    ({"calib_text": "britannica"}, "evaluation text"),
])
def test_bad_removal_configs_are_refused(kwargs, message):
    with pytest.raises(AttnshareError, match=message):
        DropConfig(**kwargs)


def test_compare_cli_writes_equal_savings_tables_and_plots(tiny_folder, tmp_path, capsys):  # noqa: F811
    folder, text = tiny_folder
    out = tmp_path / "cmp"
    argv = ["compare", "--model", str(folder), "--kv-saving", "0.25", "--param-saving", "0.05",
            "--methods", "sa", "mix", "drop", "layerdrop", "--texts", str(text), "--window", "64",
            "--max-tokens", "256", "--calib-tokens", "64", "--calib-seq-len", "32", "--heldout-tokens", "32",
            "--out", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "compare.json").read_text())
    kv = {r["method"]: r for r in data["rows"] if r["kind"] == "kv"}
    assert set(kv) == {"sa", "mix", "drop", "layerdrop"}
    for row in kv.values():  # L = 4: 25% of the KV cache is 2 half-layers = 1 removed layer = 2 SA receivers
        assert row["kv_saved"] == pytest.approx(0.25)
    (same,) = [r for r in data["rows"] if r["kind"] == "same layers"]
    receivers = re.findall(r"(\d+)<-", kv["sa"]["plan"])
    assert same["plan"] == f"drop: attention of {len(receivers)} layers ({', '.join(receivers)})"
    md = (out / "compare.md").read_text()
    assert "At equal KV cache saved" in md and "At equal parameters saved" in md and "(baseline)" in md
    assert (out / "pareto-kv.png").stat().st_size > 0 and (out / "pareto-params.png").stat().st_size > 0


def test_compare_does_not_measure_known_base_perplexities_again(tiny_folder, monkeypatch):  # noqa: F811
    folder, text = tiny_folder
    model, tokenizer = attnshare.load_model(str(folder))
    measured = []
    real = compare_module.perplexity

    def counted(model, tokenizer, config, progress=False):
        measured.append(config.text)
        return real(model, tokenizer, config, progress=progress)

    monkeypatch.setattr(compare_module, "perplexity", counted)
    config = CompareConfig(kv_saving=[0.25], param_saving=[], methods=["drop"], texts=[str(text)], window=64,
                           max_tokens=128, same_layers=False, calib_tokens=64, calib_seq_len=32, heldout_tokens=32)
    base, (row,) = compare_module.compare(model, tokenizer, config, progress=False, base_ppl={str(text): 7.0})
    assert measured == [str(text)]  # the drop row only: the base's perplexity was given
    assert base.ppl == {str(text): 7.0} and row.ratio[str(text)] == pytest.approx(row.ppl[str(text)] / 7.0)


@pytest.mark.parametrize("method", ["drop", "layerdrop"])
def test_sweep_cli_runs_the_baselines(method, tiny_folder, tmp_path):  # noqa: F811
    folder, text = tiny_folder
    out = tmp_path / "sweep.json"
    argv = ["sweep", "--model", str(folder), "--method", method, "--vary", "budget", "--values", "1", "2",
            "--calib-tokens", "64", "--calib-seq-len", "32", "--heldout-tokens", "32",
            "--text", str(text), "--window", "64", "--max-tokens", "256", "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["kv_saved"] for r in rows] == pytest.approx([1 / 4, 2 / 4])  # each removed layer: 1/L, L = 4


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_probe_replays_the_unchanged_prefix_exactly(arch):
    """A measurement that replays the base's activations below a plan equals one that recomputes them."""
    from attnshare.analysis.sensitivity import Probe, plan_divergence
    from attnshare.methods.sa.plan import nearest_donors

    model = tiny_model(arch, num_layers=6)
    probe = Probe(model, tokens=64, seq_len=32, heldout=64)  # 2 held-out blocks
    geo = attnshare.arch.geometry(model)
    plans = [SAPlan(donors=nearest_donors([4, 5], geo)), DropPlan(layers=[3]), MixPlan(drop=[3], donors={5: 1})]
    for plan in plans:
        replayed = probe.measure(plan)
        recomputed = plan_divergence(model, plan, probe.heldout, probe.reference)
        assert replayed.kl == pytest.approx(recomputed.kl, rel=1e-5, abs=1e-7)
        assert replayed.ppl == pytest.approx(recomputed.ppl, rel=1e-6)
        assert replayed.kl > 0
    assert attnshare.sharing.state.state_of(model) is None  # the model ends as the base


@pytest.mark.parametrize("plan", [DropPlan(layers=[1, 2]), LayerDropPlan(layers=[2])], ids=["drop", "layerdrop"])
def test_healing_trains_only_what_the_baseline_declares(plan):
    """drop heals what is left of its layers (MLP, norms); layerdrop the first kept block after a removed one."""
    teacher = tiny_model("llama", seed=1)
    model = attnshare.apply(tiny_model("llama"), plan)
    trainable = {n for n, _ in attnshare.get_method(plan.method).trainable_parameters(model, plan)}
    expected = ("model.layers.1.", "model.layers.2.") if plan.method == "drop" else ("model.layers.3.",)
    assert trainable and all(n.startswith(expected) for n in trainable)
    before = {n: p.clone() for n, p in model.named_parameters()}
    data = random_ids(1, 16 * 8, seed=3).view(-1)
    ids = data.view(8, 16)

    kl_before = teacher_kl(model, teacher, ids)
    train_shared(model, None, TrainConfig(seq_len=16, batch_size=4, max_steps=30, lr=3e-3, progress=False),
                 teacher=teacher, data=data)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable  # a dropped layer's input norm fed only its attention: no gradient
    assert all(any(n.startswith(f"{prefix}mlp.") for n in changed) for prefix in expected)
    assert teacher_kl(model, teacher, ids) < kl_before


def test_lazy_greedy_is_exact_when_wide_and_still_nested_when_narrow():
    model = tiny_model("llama", num_layers=6)
    drop = attnshare.get_method("drop")

    def curve(width: int) -> list[list[int]]:
        configs = [DropConfig(budget=b, greedy_width=width, **SMALL) for b in (1, 2, 3, 4)]
        return [p.layers for p in drop.make_plans(model, configs)]

    assert curve(100) == curve(0)
    narrow = curve(1)
    assert all(set(a) <= set(b) for a, b in itertools.pairwise(narrow)) and [len(x) for x in narrow] == [1, 2, 3, 4]


def test_reference_kl_equals_torch_kl_div_also_on_a_prefix():
    """KL as one dot product with the reference's probabilities equals F.kl_div, on the block and on its head."""
    import torch.nn.functional as F

    from attnshare.analysis.sensitivity import Reference

    torch.manual_seed(0)
    ref_logp = F.log_softmax(torch.randn(15, 40) * 3, dim=-1)
    logp = F.log_softmax(torch.randn(15, 40) * 3, dim=-1)
    reference = Reference.of(ref_logp)
    expected = F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
    assert reference.kl_sum(logp.clone()) == pytest.approx(expected, rel=1e-5)
    head = F.kl_div(logp[:7], ref_logp[:7], log_target=True, reduction="sum").item()
    assert reference.head(8).kl_sum(logp[:7].clone()) == pytest.approx(head, rel=1e-5)
    assert reference.kl_sum(ref_logp.clone()) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("heldout, screen", [(64, 16), (64, 32)])
def test_probe_screen_equals_a_probe_on_those_tokens(heldout, screen):
    """Screening measures exactly what a probe holding only the first ``screen`` held-out tokens measures."""
    from attnshare.analysis.sensitivity import Probe
    from attnshare.methods.sa.plan import nearest_donors

    model = tiny_model("llama", num_layers=6)
    probe = Probe(model, tokens=64, seq_len=32, heldout=heldout, screen=screen)
    small = Probe(model, tokens=64, seq_len=32, heldout=screen)
    for plan in [SAPlan(donors=nearest_donors([4, 5], attnshare.arch.geometry(model))), DropPlan(layers=[2])]:
        assert probe.measure(plan, screen=True).kl == pytest.approx(small.measure(plan).kl, rel=1e-5)
        assert probe.measure(plan).kl != pytest.approx(small.measure(plan).kl, rel=1e-3)  # the full view differs
    assert Probe(model, tokens=64, seq_len=32, heldout=32, screen=32).screen is None  # nothing cheaper to screen on


def test_bfloat16_measurement_rounds_the_forward_only(monkeypatch):
    """bf16 autocast of a float32 model's candidate forwards: the reference stays float32, a plan's KL moves by
    rounding only (a neutral plan's KL is rounding alone); float32, a bf16 model, or "auto" without native bf16
    run the forward unchanged."""
    from contextlib import nullcontext

    from attnshare.analysis import sensitivity
    from attnshare.analysis.sensitivity import Probe, measurement_precision

    model = tiny_model("llama", num_layers=6)
    assert measurement_precision("float32", model) is nullcontext
    assert measurement_precision("bfloat16", tiny_model("llama").to(torch.bfloat16)) is nullcontext
    monkeypatch.setattr(sensitivity, "fast_bfloat16", lambda device: False)
    assert measurement_precision("auto", model) is nullcontext
    monkeypatch.setattr(sensitivity, "fast_bfloat16", lambda device: True)
    assert measurement_precision("auto", model) is not nullcontext
    with pytest.raises(AttnshareError, match="Unknown measurement precision"):
        measurement_precision("fp8", model)

    exact = Probe(model, tokens=64, seq_len=32, heldout=64)
    rounded = Probe(model, tokens=64, seq_len=32, heldout=64, precision="bfloat16")
    assert all(r.logp.dtype == torch.float32 for r in rounded.reference)
    assert torch.equal(rounded.reference[0].logp, exact.reference[0].logp)
    neutral = DropPlan(layers=[])
    assert exact.measure(neutral).kl == pytest.approx(0.0, abs=1e-9)
    assert 0.0 < rounded.measure(neutral).kl < 1e-3  # the forward really ran in bf16, and only rounded


def test_screened_greedy_measures_only_the_shortlist_on_every_token():
    """Every candidate is screened, the shortlist re-measured; the choice follows the full measurements."""
    from attnshare.analysis.sensitivity import Divergence, greedy_select

    full_kl = {0: 0.5, 1: 0.1, 2: 0.3, 3: 0.2, 4: 0.9}
    screen_kl = {0: 0.4, 1: 0.3, 2: 0.2, 3: 0.25, 4: 0.8}  # the screen ranks 2 first; the full measurement 1
    calls = {"full": [], "screen": []}

    def full(items):
        calls["full"].append(tuple(items))
        return Divergence(sum(full_kl[i] for i in items), 1.0)

    def screen(items):
        calls["screen"].append(tuple(items))
        return Divergence(sum(screen_kl[i] for i in items), 1.0)

    steps = greedy_select(full, list(full_kl), 2, shortlist=3, screen=screen)
    assert sorted(calls["screen"]) == [(c,) for c in full_kl]
    assert sorted(c for c in calls["full"] if len(c) == 1) == [(1,), (2,), (3,)]  # the screen's best three
    assert steps[0].chosen == [1] and steps[1].chosen == [1, 3]


def test_a_target_within_one_percent_of_a_unit_asks_for_that_unit():
    """--kv-saving 0.0667 on 30 layers is 4.002 of 60 half-layers: 4, as the user means 1/15; 4.02 is 5."""
    from attnshare.methods.sa import SAConfig
    from attnshare.methods.sa.planner import sa_budget
    from attnshare.plan import units_for

    assert units_for(0.0667 * 60) == 4 and units_for(4.0) == 4 and units_for(4.02) == 5 and units_for(3.5) == 4
    assert sa_budget(SAConfig(kv_saving=0.0667), 30) == 4
