"""The shared training loop: losses, data order, frozen parameters, budget, exact resume, multi-process parity."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_worker, tiny_model
from safetensors.torch import load_file

from attnshare.config import add_dataclass_args, dataclass_from_args
from attnshare.errors import AttnshareError
from attnshare.training import (
    TrainConfig,
    attention_map_kl,
    batch_indices,
    distill_objective,
    kl_distill,
    latest_checkpoint,
    lm_loss,
    lm_objective,
    lr_factor,
    pair_frobenius,
    select_trainable,
    train,
)

ATTN = lambda name, param: "self_attn" in name


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls on 2 shared cores are ~100x slower with 2 spinning threads than with 1.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_ids(n_tokens: int = 64 * 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n_tokens,), generator=torch.Generator().manual_seed(seed))


def cfg(**kw) -> TrainConfig:
    base = {"seq_len": 32, "batch_size": 4, "max_steps": 6, "lr": 1e-2, "warmup": 1, "progress": False, "log_every": 1}
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------------------- losses


def test_lm_loss_is_shifted_cross_entropy():
    logits, ids = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(lm_loss(logits, ids), expected)


def test_kl_distill_matches_definition_and_vanishes_on_equal_logits():
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    p = F.softmax(t / 2, -1)
    expected = (p * (p.log() - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(kl_distill(s, t, 2.0), expected)
    assert kl_distill(t, t, 1.0).abs() < 1e-6
    assert kl_distill(s, t, 1.0) > 0


def test_attention_map_kl():
    mask = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    maps = [torch.randn(1, 2, 4, 4).masked_fill(~mask, float("-inf")).softmax(-1) for _ in range(3)]
    assert attention_map_kl(maps, maps).abs() < 1e-6
    assert attention_map_kl(maps[0], maps[1]) > 0
    torch.testing.assert_close(
        attention_map_kl(maps[:2], maps[1:]),
        (attention_map_kl(maps[0], maps[1]) + attention_map_kl(maps[1], maps[2])) / 2,
    )


def test_pair_frobenius_is_mean_of_unsquared_norms():
    a, b = torch.zeros(2, 2), torch.full((2, 2), 1.0)  # ||a - b|| = 2
    c = torch.full((3,), 2.0)  # ||c|| = sqrt(12)
    torch.testing.assert_close(pair_frobenius([(a, b), (a, a)]), torch.tensor(1.0))
    torch.testing.assert_close(pair_frobenius([((a, c), (b, torch.zeros(3)))]), torch.tensor(2.0 + 12**0.5))
    assert pair_frobenius(lambda: torch.tensor(5.0)) == 5.0
    w = torch.zeros(2, 2, requires_grad=True)
    pair_frobenius([(w, torch.zeros(2, 2))]).backward()  # zero difference: finite (zero) gradient
    assert torch.equal(w.grad, torch.zeros(2, 2))


# ------------------------------------------------------------------------------------------ schedule and data order


def test_lr_factor():
    assert [lr_factor(s, 2, 10, "constant") for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_factor(2, 2, 10, "cosine") == 1.0 and lr_factor(10, 2, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(6, 2, 10, "linear") == pytest.approx(0.5)
    # a time schedule: the decay follows the share of the budget spent, whatever the step
    assert lr_factor(3, 2, 1000, "cosine", progress=1.0) == pytest.approx(0.0)
    assert lr_factor(500, 2, 1000, "linear", progress=0.25) == pytest.approx(0.75)
    assert lr_factor(0, 2, 1000, "cosine", progress=0.9) == 0.5  # warm-up still counts steps


def test_time_progress_spans_the_budget_and_continues_a_resumed_schedule():
    from attnshare.training.loop import time_progress

    assert time_progress(0.0, 60.0) == 0.0 and time_progress(30.0, 60.0) == 0.5 and time_progress(90.0, 60.0) == 1.0
    assert time_progress(30.0, 60.0, resumed_at=0.5) == pytest.approx(0.75)


def test_global_batch_does_not_depend_on_its_split():
    n = 40
    for step in range(7):  # crosses epoch boundaries (5 global batches of 8 per epoch)
        single = batch_indices(n, step, 0, 0, 1, 8, 1, seed=1)
        two_procs = torch.cat([batch_indices(n, step, 0, p, 2, 4, 1, seed=1) for p in range(2)])
        accum = torch.cat([batch_indices(n, step, m, p, 2, 2, 2, seed=1) for m in range(2) for p in range(2)])
        assert torch.equal(single, two_procs) and torch.equal(single, accum)
    epoch = torch.cat([batch_indices(n, s, 0, 0, 1, 8, 1, seed=1) for s in range(5)])
    assert sorted(epoch.tolist()) == list(range(n))
    assert not torch.equal(batch_indices(n, 0, 0, 0, 1, 8, 1, seed=1), batch_indices(n, 0, 0, 0, 1, 8, 1, seed=2))


def test_select_trainable():
    model = tiny_model("llama", num_layers=2)
    names = select_trainable(model, ATTN)
    assert names and all("self_attn" in n for n in names)
    assert select_trainable(model, list(model.named_parameters())[:2]) == [n for n, _ in model.named_parameters()][:2]
    with pytest.raises(AttnshareError, match="no parameter named"):
        select_trainable(model, ["nope"])
    with pytest.raises(AttnshareError, match="No parameter"):
        select_trainable(model, lambda n, p: False)


# ------------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "bad",
    [
        {"seq_len": 1}, {"batch_size": 0}, {"grad_accum": 0}, {"lr": 0.0}, {"lr": float("nan")},
        {"weight_decay": -1.0}, {"warmup": -1}, {"max_steps": 0}, {"max_minutes": 0.0},
        {"checkpoint_every": -1}, {"distill_temperature": 0.0}, {"schedule": "step"},
        {"mixed_precision": "fp16"}, {"resume": True}, {"betas": (0.9, 1.0)}, {"max_tokens": 8, "seq_len": 32},
        {"distill_target": "probs"}, {"distill_target": "hidden", "distill_temperature": 2.0},
        {"schedule_by": "wall"}, {"schedule_by": "time"},
    ],
)
def test_bad_config_gives_one_sentence(bad):
    with pytest.raises(AttnshareError) as err:
        TrainConfig(**bad)
    message = str(err.value)
    assert message.endswith(".") and "\n" not in message and message.count(". ") == 0


def test_cli_flags_round_trip():
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, TrainConfig)
    args = parser.parse_args(["--seq-len", "64", "--resume", "--out-dir", "x", "--betas", "0.8", "0.9", "--max-minutes", "2"])
    config = dataclass_from_args(TrainConfig, args)
    assert (config.seq_len, config.resume, config.out_dir, config.betas, config.max_minutes) == (64, True, "x", (0.8, 0.9), 2.0)
    assert dataclass_from_args(TrainConfig, parser.parse_args([])) == TrainConfig()


def test_too_little_data_and_too_long_blocks():
    model = tiny_model("llama", num_layers=1)
    with pytest.raises(AttnshareError, match="fewer than one global batch"):
        train(model, lm_objective(), cfg(batch_size=8), data=random_ids(4 * 32))
    with pytest.raises(AttnshareError, match="longer than the model's context"):
        train(model, lm_objective(), cfg(seq_len=512), data=random_ids())
    with pytest.raises(AttnshareError, match="tokenizer"):
        train(model, lm_objective(), cfg())


# ----------------------------------------------------------------------------------------------------- training


class CharTokenizer:
    """A stand-in tokenizer: one id per character (mod 128), called like a Hugging Face tokenizer."""

    def __call__(self, text, add_special_tokens=True, return_attention_mask=False):
        return {"input_ids": [ord(c) % 128 for c in text]}


def test_trains_on_a_text_file(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 40, encoding="utf-8")
    model = tiny_model("llama", num_layers=1)
    config = cfg(text=str(text), max_tokens=1024, max_steps=2)
    result = train(model, lm_objective(), config, trainable=ATTN, tokenizer=CharTokenizer())
    assert result.steps == 2 and result.tokens == 2 * 4 * 32
    with pytest.raises(AttnshareError, match="Unknown text"):
        train(model, lm_objective(), cfg(text=str(tmp_path / "missing.txt")), tokenizer=CharTokenizer())


class StartTokenizer(CharTokenizer):
    bos_token_id = 1


def reference_samples(model, start: int, rows: int, length: int, batch: int, seed: int) -> torch.Tensor:
    """Ancestral sampling without a cache: every step runs the whole prefix; same generator order as the sampler."""
    generator, chunks = torch.Generator().manual_seed(seed), []
    for first in range(0, rows, batch):
        ids = torch.full((min(batch, rows - first), 1), start)
        while ids.shape[1] < length:
            with torch.no_grad():
                probs = torch.softmax(model(input_ids=ids, use_cache=False).logits[:, -1].float(), dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
        chunks.append(ids)
    return torch.cat(chunks)


def test_teacher_samples_are_the_teachers_own_draws_and_are_cached(tmp_path, monkeypatch):
    from attnshare.training.samples import samples_path, teacher_samples

    monkeypatch.setenv("ATTNSHARE_CACHE", str(tmp_path))
    teacher = tiny_model("llama", num_layers=2).double()  # float64: cached and uncached probabilities agree exactly
    ids = teacher_samples(teacher, StartTokenizer(), tokens=3 * 16 + 1, length=16, seed=3, batch=3, progress=False)
    assert ids.shape == (4, 16) and bool((ids[:, 0] == 1).all())  # ceil(49 / 16) blocks, each from the start token
    assert torch.equal(ids, reference_samples(teacher, 1, rows=4, length=16, batch=3, seed=3))
    path = samples_path(teacher, 4, 16, 3)
    assert path.is_file() and path.parent == tmp_path / "samples"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # nothing half-written left behind

    def no_forward(*args, **kwargs):
        raise AssertionError("cached samples must not run the teacher")

    monkeypatch.setattr(teacher, "forward", no_forward)
    assert torch.equal(teacher_samples(teacher, StartTokenizer(), 49, 16, seed=3, progress=False), ids)
    monkeypatch.undo()
    monkeypatch.setenv("ATTNSHARE_CACHE", str(tmp_path))
    other = teacher_samples(teacher, StartTokenizer(), 49, 16, seed=4, batch=4, progress=False)
    assert samples_path(teacher, 4, 16, 4) != path and not torch.equal(other, ids)
    with pytest.raises(AttnshareError, match="BOS or EOS"):
        teacher_samples(teacher, CharTokenizer(), 49, 16, seed=5, progress=False)


def test_trains_on_teacher_samples(tmp_path, monkeypatch):
    from attnshare.training.loop import load_blocks
    from attnshare.training.samples import teacher_samples

    monkeypatch.setenv("ATTNSHARE_CACHE", str(tmp_path))
    teacher, student = tiny_model("llama", num_layers=1), tiny_model("llama", num_layers=1)
    config = cfg(text="teacher", teacher_tokens=8 * 32, max_steps=2)
    blocks = load_blocks(config, StartTokenizer(), teacher=teacher)
    assert torch.equal(blocks, teacher_samples(teacher, StartTokenizer(), 8 * 32, 32, seed=0, progress=False))
    result = train(student, distill_objective(temperature=1.0), config, teacher=teacher, trainable=ATTN,
                   tokenizer=StartTokenizer())
    assert result.steps == 2 and result.tokens == 2 * 4 * 32
    with pytest.raises(AttnshareError, match="has none"):
        train(student, lm_objective(), config, trainable=ATTN, tokenizer=StartTokenizer())
    with pytest.raises(AttnshareError, match="teacher_tokens"):
        cfg(text="teacher", teacher_tokens=16)


def test_only_trainable_parameters_change():
    model = tiny_model("llama", num_layers=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, lm_objective(), cfg(max_steps=3), trainable=ATTN, data=random_ids())
    assert result.steps == 3 and result.tokens == 3 * 4 * 32 and result.stopped == "max_steps"
    for n, p in model.named_parameters():
        if "self_attn" in n:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n
        assert p.requires_grad  # flags restored after training
    assert not model.training  # mode restored


def test_loss_decreases_when_overfitting():
    model = tiny_model("llama", num_layers=2)
    result = train(model, lm_objective(), cfg(batch_size=4, max_steps=25, lr=2e-2, schedule="constant"),
                   data=random_ids(4 * 32))
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < 0.5 * first, result.losses


def test_distillation_reduces_kl_and_leaves_teacher_alone():
    teacher, student = tiny_model("llama", num_layers=2, seed=0), tiny_model("llama", num_layers=2, seed=0)
    with torch.no_grad():  # perturb the student's attention: distillation must pull it back
        for n, p in student.named_parameters():
            if "self_attn" in n:
                p.add_(0.2 * torch.randn_like(p))
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    result = train(student, distill_objective(temperature=1.0), cfg(max_steps=30, lr=2e-2, schedule="constant"), teacher=teacher,
                   trainable=ATTN, data=random_ids())
    assert result.losses[-1][1] < 0.6 * result.losses[0][1], result.losses
    assert "kl" in result.metrics
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())


# ---------------------------------------------------------------------------- distilling the LM head's input


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_head_metric_is_the_second_order_kl(scale):
    """1/2 d^T M d equals KL(softmax(c W h) || softmax(c W (h + d))) to second order, for a head that scales its
    logits by c (the scale is fitted from the logits)."""
    from attnshare.training.losses import head_metric, hidden_kl

    gen = torch.Generator().manual_seed(0)
    weight, h = torch.randn(50, 8, generator=gen), torch.randn(1, 8, generator=gen)
    metric = head_metric([(h, scale * h @ weight.T)], weight)
    d = 1e-3 * torch.randn(1, 8, generator=gen)
    t, s = ((scale * x.double() @ weight.double().T).log_softmax(-1) for x in (h, h + d))
    exact = (t.exp() * (t - s)).sum()  # float64: the KL is ~1e-7
    approx = hidden_kl((h + d)[None], h[None], metric)
    assert approx.item() == pytest.approx(exact.item(), rel=1e-2)


def _flops(objective, student, teacher, ids) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss, _ = objective(student, {"input_ids": ids}, teacher)
        loss.backward()
    return counter.get_total_flops()


def _objectives(target: str):
    """(objective maker, student maker) for the generic distillation and LiSA's."""
    import attnshare
    from attnshare.methods.lisa import LiSAPlan
    from attnshare.methods.lisa.training import lisa_objective

    def lisa(student, teacher, metric):
        return lisa_objective(student, teacher, [2, 3], metric=metric)

    def generic(student, teacher, metric):
        return distill_objective(metric=metric)

    def lisa_student(model):
        return attnshare.apply(model, LiSAPlan(layers=[2, 3], rank=4))

    return {"lisa": (lisa, lisa_student), "generic": (generic, lambda m: m)}[target]


@pytest.mark.parametrize("target", ["generic", "lisa"])
def test_hidden_distillation_cost_does_not_grow_with_the_vocabulary(target):
    """One end-to-end step (teacher forward, student forward and backward) on a tiny model with a 1k and a 256k
    vocabulary: distilling the head's input adds only the last position's head (two models, B rows), while
    distilling logits adds the head at every token."""
    import transformers
    from conftest import tiny_config
    from helpers import random_ids

    make_objective, make_student = _objectives(target)
    ids = random_ids(2, 32)
    cost = {}
    for vocab in (1024, 262144):
        config = tiny_config("llama")
        config.vocab_size = vocab
        torch.manual_seed(0)
        teacher = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
        student = make_student(transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"))
        for name, p in student.named_parameters():
            p.requires_grad_(".lisa_" in name or (target == "generic" and "self_attn" in name))
        metric = torch.eye(config.hidden_size)
        cost[vocab] = {kind: _flops(make_objective(student, teacher, m), student, teacher, ids)
                       for kind, m in (("hidden", metric), ("logits", None))}
    grown = 262144 - 1024
    last_position_heads = 2 * (2 * ids.shape[0] * config.hidden_size * grown)  # teacher and student, 2 flops/MAC
    assert cost[262144]["hidden"] - cost[1024]["hidden"] <= last_position_heads
    assert cost[262144]["logits"] - cost[1024]["logits"] >= 2 * ids.numel() * config.hidden_size * grown * 2


def test_hidden_distillation_trains():
    """``distill_target="hidden"`` through train_shared: the teacher's metric comes from the training blocks, and
    training lowers both its loss and the true next-token KL on held-out ids."""
    from helpers import teacher_kl

    import attnshare
    from attnshare.methods.lisa import LiSAPlan
    from attnshare.training import train_shared
    from attnshare.training.shared import teacher_head_metric

    teacher = tiny_model("llama", num_layers=4)
    student = attnshare.apply(tiny_model("llama", num_layers=4), LiSAPlan(layers=[2, 3], rank=4))
    with torch.no_grad():  # off its start, so that there is something to learn back
        for name, p in student.named_parameters():
            if ".lisa_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    data, held_out = random_ids(), random_ids(4 * 32, seed=5).view(4, 32)
    objective = distill_objective(metric=teacher_head_metric(teacher, data.view(-1, 32)))
    before = objective(student, {"input_ids": held_out}, teacher)[0].item(), teacher_kl(student, teacher, held_out)
    train_shared(student, None, cfg(max_steps=30, lr=1e-2, schedule="constant", distill_target="hidden"),
                 teacher=teacher, data=data)
    with torch.no_grad():
        after = objective(student, {"input_ids": held_out}, teacher)[0].item(), teacher_kl(student, teacher, held_out)
    assert after[0] < 0.85 * before[0] and after[1] < 0.85 * before[1], (before, after)


def test_auto_target_is_the_methods_choice():
    """``--distill-target auto``: LiSA distils head inputs, SA (and a model with both) logits; a temperature other
    than 1 keeps the logits, since the head metric is second-order at temperature 1."""
    import attnshare
    from attnshare.methods.lisa import LiSAPlan
    from attnshare.methods.sa import SAPlan
    from attnshare.training.shared import distillation, preferred_target

    lisa = attnshare.apply(tiny_model("llama"), LiSAPlan(layers=[2], rank=4))
    both = attnshare.apply(tiny_model("llama"), [LiSAPlan(layers=[3], rank=4), SAPlan(donors={1: 0})])
    assert preferred_target(lisa) == "hidden" and preferred_target(both) == "logits"
    assert preferred_target(attnshare.apply(tiny_model("llama"), SAPlan(donors={2: 1}))) == "logits"
    teacher, data = tiny_model("llama"), random_ids()
    metric = distillation(teacher, cfg(), data=data, preferred="hidden")
    assert metric.shape == (64, 64) and torch.allclose(metric, metric.T, atol=1e-6)
    assert torch.linalg.eigvalsh(metric.double()).min() > -1e-6  # a Fisher metric is positive semi-definite
    assert distillation(teacher, cfg(distill_temperature=2.0), data=data, preferred="hidden") is None
    assert distillation(teacher, cfg(distill_target="logits"), data=data, preferred="hidden") is None


def test_grad_accum_matches_one_big_batch():
    runs = []
    for batch_size, accum in ((4, 1), (2, 2)):
        model = tiny_model("llama", num_layers=2)
        result = train(model, lm_objective(), cfg(batch_size=batch_size, grad_accum=accum, max_steps=3),
                       trainable=ATTN, data=random_ids())
        runs.append(([x[1] for x in result.losses], model.state_dict()))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-5)
    for key, value in runs[0][1].items():
        torch.testing.assert_close(value, runs[1][1][key], atol=1e-5, rtol=1e-4)


def test_max_minutes_stops_cleanly(tmp_path):
    model = tiny_model("llama", num_layers=1)
    result = train(model, lm_objective(), cfg(max_steps=1000, max_minutes=1e-6, out_dir=str(tmp_path)),
                   trainable=ATTN, data=random_ids())
    assert result.stopped == "max_minutes" and result.steps == 1 and len(result.losses) == 1
    assert result.checkpoint and json.loads((Path(result.checkpoint) / "state.json").read_text())["step"] == 1


# ------------------------------------------------------------------------------------------------ checkpoints


class Killed(Exception):
    pass


def killed_after(objective, calls: int):
    """The objective, raising ``Killed`` on call ``calls + 1`` (a crash in the middle of a step)."""
    count = {"n": 0}

    def wrapped(model, batch, teacher):
        count["n"] += 1
        if count["n"] > calls:
            raise Killed
        return objective(model, batch, teacher)

    return wrapped


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    config = {"max_steps": 6, "checkpoint_every": 3, "grad_accum": 2, "batch_size": 2, "weight_decay": 0.01}
    straight_model = tiny_model("llama", num_layers=2)
    straight = train(straight_model, lm_objective(), cfg(**config, out_dir=str(tmp_path / "a")), trainable=ATTN,
                     data=random_ids(), fingerprint="plan-1")

    crashed = tiny_model("llama", num_layers=2)
    with pytest.raises(Killed):  # 3 steps of 2 micro-steps, then dies inside step 4
        train(crashed, killed_after(lm_objective(), 7), cfg(**config, out_dir=str(tmp_path / "b")), trainable=ATTN,
              data=random_ids(), fingerprint="plan-1")
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-00000003"
    files = {p.suffix for p in latest_checkpoint(tmp_path / "b").iterdir()}
    assert files == {".safetensors", ".json"}  # never pickle

    resumed_model = tiny_model("llama", num_layers=2)
    resumed = train(resumed_model, lm_objective(), cfg(**config, out_dir=str(tmp_path / "b"), resume=True),
                    trainable=ATTN, data=random_ids(), fingerprint="plan-1")
    assert [s for s, _ in resumed.losses] == [1, 2, 3, 4, 5, 6]
    assert [x[1] for x in resumed.losses] == pytest.approx([x[1] for x in straight.losses], abs=1e-6)
    assert resumed.steps == 6 and resumed.tokens == straight.tokens
    for (n, a), b in zip(straight_model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)


def test_resume_refuses_another_plan_and_missing_checkpoints(tmp_path):
    model = tiny_model("llama", num_layers=1)
    train(model, lm_objective(), cfg(max_steps=1, out_dir=str(tmp_path)), trainable=ATTN, data=random_ids(),
          fingerprint="plan-1")
    with pytest.raises(AttnshareError, match="checkpoint .* was made for another plan"):
        train(model, lm_objective(), cfg(max_steps=2, out_dir=str(tmp_path), resume=True), trainable=ATTN,
              data=random_ids(), fingerprint="plan-2")
    with pytest.raises(AttnshareError, match="trains other parameters"):
        train(model, lm_objective(), cfg(max_steps=2, out_dir=str(tmp_path), resume=True),
              trainable=lambda n, p: "mlp" in n, data=random_ids(), fingerprint="plan-1")
    with pytest.raises(AttnshareError, match="data layout"):
        train(model, lm_objective(), cfg(max_steps=2, batch_size=2, out_dir=str(tmp_path), resume=True), trainable=ATTN,
              data=random_ids(), fingerprint="plan-1")
    with pytest.raises(AttnshareError, match="no checkpoint"):
        train(model, lm_objective(), cfg(max_steps=2, out_dir=str(tmp_path / "empty"), resume=True), data=random_ids())
    (latest_checkpoint(tmp_path) / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(AttnshareError, match="missing or corrupt"):
        train(model, lm_objective(), cfg(max_steps=2, out_dir=str(tmp_path), resume=True), trainable=ATTN,
              data=random_ids(), fingerprint="plan-1")


# ----------------------------------------------------------------------------------------------- multi-process


WORKER = ROOT / "tests" / "train_worker.py"


def test_two_processes_match_one(tmp_path):
    """2 gloo CPU processes with batch 2 each == 1 process with batch 4 (tests/train_worker.py, ~6 s)."""
    run_worker(WORKER, str(tmp_path / "two"), "2", processes=2)
    run_worker(WORKER, str(tmp_path / "one"), "4")
    two, one = (json.loads((tmp_path / k / "result.json").read_text()) for k in ("two", "one"))
    assert (two["world"], one["world"]) == (2, 1)
    assert [x[1] for x in two["losses"]] == pytest.approx([x[1] for x in one["losses"]], abs=1e-5)
    p2, p1 = (load_file(str(tmp_path / k / "params.safetensors")) for k in ("two", "one"))
    for key in p1:
        torch.testing.assert_close(p2[key], p1[key], atol=1e-5, rtol=1e-4)


def test_two_processes_sample_the_teacher_once(tmp_path):
    """``--text teacher`` on 2 gloo processes: the main process draws and caches the samples, the other waits and
    reads them (no teacher forward), and both train on the same blocks (tests/train_worker.py, ~5 s)."""
    run_worker(WORKER, str(tmp_path), "samples", processes=2, ATTNSHARE_CACHE=str(tmp_path / "cache"))
    main, other = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert main["forwards"] == 15 and other["forwards"] == 0  # one batch of 4 rows: 15 decoding steps, on rank 0
    assert main["blocks"] == other["blocks"] and len(main["blocks"]) == 4
    assert len(list((tmp_path / "cache" / "samples").iterdir())) == 1


def test_minutes_report_refuses_folders_without_a_budget_in_one_sentence(tmp_path):
    """``python -m attnshare.report.minutes``: a folder without train.json, or a record without its budget (and no
    --budgets), or --budgets of the wrong length, each get one sentence and no traceback."""
    from attnshare.report.minutes import main, read_training

    with pytest.raises(AttnshareError, match="has no train.json"):
        read_training(tmp_path)
    (tmp_path / "train.json").write_text(json.dumps({"steps": 3}))
    with pytest.raises(AttnshareError, match="records no budget .* pass it with --budgets"):
        read_training(tmp_path)
    assert read_training(tmp_path, 5.0)["budget minutes"] == 5.0
    with pytest.raises(SystemExit, match=r"^error: --budgets lists 2 values for 1 artifacts\.$"):
        main([str(tmp_path), "--budgets", "1", "2"])


def test_minutes_report_keeps_earlier_rows_and_refuses_other_protocols(tmp_path, capsys):
    """``--rows`` carries the rows of an earlier ``--json`` into the table, the JSON and the PNG as they were
    measured; rows of another text or length, or a file the report did not write, get one sentence."""
    pytest.importorskip("matplotlib")
    from attnshare.report.minutes import main

    rows = [{"artifact": f"out/m{b}", "plan": "lisa", "budget minutes": b, "local steps": 5, "local minutes": None,
             "local tokens": None, "e2e steps": 2 * b, "e2e minutes": None, "e2e tokens": 1024 * b, "ppl": p,
             "ratio": p / 20.0} for b, p in ((1, 30.0), (5, 25.0))]
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"base ppl": 20.0, "text": "britannica", "max tokens": 4096, "rows": rows}))
    out, png = tmp_path / "again.json", tmp_path / "curve.png"
    assert main(["--rows", str(earlier), "--json", str(out), "--png", str(png)]) == 0
    assert json.loads(out.read_text())["rows"] == rows and png.stat().st_size > 0
    table = capsys.readouterr().out
    assert "base ppl 20.000" in table and "| 5 | 5 | 10 | 5,120 | 25.00 | 1.250 |" in table
    with pytest.raises(SystemExit, match=r"^error: --rows .* was measured on britannica \(first 4096 tokens\), not "
                                         r"pyref \(first 4096\); pass the same --text and --max-tokens\.$"):
        main(["--rows", str(earlier), "--text", "pyref"])
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match=r"^error: --rows .* is not a file this report wrote with --json"):
        main(["--rows", str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit, match=r"^error: nothing to report: pass artifact folders, --rows, or both\.$"):
        main([])


def test_minutes_report_joins_new_rows_only_under_the_same_base(tmp_path, monkeypatch, capsys):
    """An artifact's row joins ``--rows`` when the base ppl measured now matches the file's (within 0.1%); a base
    that moved (another model, corpus or version) gets one sentence and nothing is written."""
    from attnshare.report import minutes

    earlier = tmp_path / "earlier.json"
    old = {"artifact": "out/m1", "plan": "lisa", "budget minutes": 1.0, "local steps": 5, "local minutes": None,
           "local tokens": None, "e2e steps": 2, "e2e minutes": None, "e2e tokens": 2048, "ppl": 30.0, "ratio": 1.5}
    earlier.write_text(json.dumps({"base ppl": 20.0, "text": "britannica", "max tokens": 4096, "rows": [old]}))
    folder = tmp_path / "m60"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps({"budget minutes": 60.0}))
    new = dict(old, artifact=str(folder), **{"budget minutes": 60.0, "ppl": 24.0, "ratio": 24.0 / 20.01})
    out = tmp_path / "rows.json"
    monkeypatch.setattr(minutes, "measure_rows", lambda records, protocol: (20.01, [new]))
    assert minutes.main([str(folder), "--rows", str(earlier), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["rows"] == [old, new]
    assert "| 60 | 5 | 2 | 2,048 | 24.00 | 1.199 |" in capsys.readouterr().out
    out.unlink()
    monkeypatch.setattr(minutes, "measure_rows", lambda records, protocol: (25.0, [new]))
    with pytest.raises(SystemExit, match=r"^error: the base ppl is 25\.000 here but 20\.000 in --rows .*: the rows "
                                         r"would not be comparable \(another model, corpus or version\?\)\.$"):
        minutes.main([str(folder), "--rows", str(earlier), "--json", str(out)])
    assert not out.exists()
