"""PostShare: the pair regulariser, regularised post-training then sharing, artifacts, resume, CLI, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from helpers import greedy_generate, greedy_no_cache, logits, random_ids

import attnshare
from attnshare.arch import attention, geometry
from attnshare.errors import AttnshareError
from attnshare.methods import get_method
from attnshare.methods.directshare import BANK
from attnshare.methods.directshare.plan import GROUP
from attnshare.methods.postshare import PostShareConfig, PostSharePlan, pair_regulariser, pair_slices
from attnshare.sharing.state import state_of
from attnshare.training import TrainConfig


class CharTokenizer:
    """A stand-in tokenizer: one id per character (mod 128), called like a Hugging Face tokenizer."""

    def __call__(self, text, add_special_tokens=True, return_attention_mask=False):
        return {"input_ids": [ord(c) % 128 for c in text]}


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("To be, or not to be, that is the question. " * 30, encoding="utf-8")
    return str(path)


def ps_plan(model, ratio=0.25, **kw) -> PostSharePlan:
    """A PostShare plan by the cosine rule, without the keep-the-better check unless asked (tests of training)."""
    kw = {"select": "cosine", "guard_tokens": 0, **kw}
    return get_method("postshare").make_plan(model, PostShareConfig(ratio=ratio, **kw))


def cfg(text, **kw) -> TrainConfig:
    return TrainConfig(**{"text": text, "seq_len": 16, "batch_size": 2, "max_steps": 3, "lr": 1e-2,
                          "progress": False, **kw})


def pair_distance(model, plan) -> float:
    return sum(float(torch.linalg.vector_norm(x - y).detach()) for a, b in pair_slices(model, plan) for x, y in zip(a, b))


def test_regulariser_is_mean_of_unsquared_qkv_norms():
    model = tiny_model("qwen2")
    plan = PostSharePlan(pairs=[(2, 0, 1, 1), (3, 1, 0, 0)])
    geo = geometry(model)
    g, d = geo.group_size, geo.head_dim
    expected = 0.0
    for layer, unit, root_layer, root_unit in plan.pairs:
        for p, r in (("q", g * d), ("k", d), ("v", d)):
            a = getattr(attention(model, layer), f"{p}_proj").weight[unit * r : (unit + 1) * r]
            b = getattr(attention(model, root_layer), f"{p}_proj").weight[root_unit * r : (root_unit + 1) * r]
            expected += float(torch.linalg.vector_norm(a - b).detach()) / 2
    assert float(pair_regulariser(model, plan)().detach()) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("arch_name", ["llama", "qwen2", "gemma3_text"])
def test_fit_pulls_pairs_together_then_shares_them(arch_name, text):
    model = tiny_model(arch_name)
    params = model.num_parameters()
    plan = ps_plan(model, data_term="lm", reg_weight=100.0, train_scope="attention")  # N = floor(0.25 * 4 * 2) = 2
    before = pair_distance(model, plan)
    result = attnshare.train(model, CharTokenizer(), plan, cfg(text))
    assert result.steps == 3 and "reg" in result.metrics
    assert hasattr(model, BANK) and attnshare.api.applied_plans(model)[0].method == "postshare"
    unit = (2 * 16 + 16 + 16) * 64 + ((2 * 16 + 16 + 16) if arch_name == "qwen2" else 0)  # q/k/v rows (+ biases)
    assert params - model.num_parameters() == 2 * unit
    assert before > 0
    ids = random_ids(2, 10, seed=3)
    assert torch.equal(greedy_generate(model, ids, 12), greedy_no_cache(model, ids, 12))


def test_regularised_training_shrinks_the_pair_distance(text):
    from attnshare.methods.postshare.method import pair_regulariser as reg_of
    from attnshare.training import lm_objective, train

    model = tiny_model("llama")
    plan = ps_plan(model)
    before = pair_distance(model, plan)
    train(model, lm_objective(regularizer=reg_of(model, plan), weight=100.0), cfg(text),
          trainable=lambda n, p: "self_attn" in n, tokenizer=CharTokenizer())
    assert pair_distance(model, plan) < before - 0.05


@pytest.mark.parametrize("scope", ["full", "attention", "pairs"])
def test_artifact_stores_only_trained_unique_weights_and_reloads(scope, text, tmp_path):
    from safetensors.torch import load_file

    model = tiny_model("llama")
    base_attention = sum(p.numel() for n, p in model.named_parameters() if "self_attn" in n)
    plan = ps_plan(model, train_scope=scope, data_term="distill")
    attnshare.train(model, CharTokenizer(), plan, cfg(text, max_steps=2))
    out = attnshare.save(model, tmp_path / "art")
    tensors = load_file(out / "params.safetensors")
    saved = sum(t.numel() for t in tensors.values())
    replaced = 2 * (2 * 16 + 2 * 16) * 64
    if scope == "full":
        assert saved == model.num_parameters()
    elif scope == "pairs":  # only the bank: the paired layers' unique q/k/v slices
        assert set(tensors) == {f"{BANK}.{k}" for k in "qkv"}
        assert saved == sum(p.numel() for n, p in model.named_parameters() if n.startswith(BANK))
    else:
        assert saved == base_attention - replaced
        assert all("self_attn" in k or k.startswith(BANK) for k in tensors)
    ids = random_ids(1, 12)
    loaded, _ = attnshare.load(out, model=tiny_model("llama"))
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_resume_reproduces_the_uninterrupted_run(text, tmp_path):
    ids = random_ids(1, 12)
    full = tiny_model("llama")
    attnshare.train(full, CharTokenizer(), ps_plan(full), cfg(text, max_steps=4))
    part = tiny_model("llama")
    attnshare.train(part, CharTokenizer(), ps_plan(part), cfg(text, max_steps=4, checkpoint_every=2,
                                                                 out_dir=str(tmp_path / "ck")))
    resumed = tiny_model("llama")  # a fresh run that picks up the last checkpoint (step 4: nothing left to do)
    result = attnshare.train(resumed, CharTokenizer(), ps_plan(resumed),
                             cfg(text, max_steps=4, out_dir=str(tmp_path / "ck"), resume=True))
    assert result.steps == 4
    torch.testing.assert_close(logits(resumed, ids), logits(full, ids), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(part, ids), logits(full, ids), rtol=1e-5, atol=1e-6)


def test_cli_train_postshare(tmp_path, text):
    from test_foundation import _tiny_tokenizer

    from attnshare.cli import main

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    art = tmp_path / "ps"
    argv = ["train", "--model", str(folder), "--method", "postshare", "--ratio", "0.3", "--train-scope", "attention",
            "--data-term", "lm", "--text", text, "--seq-len", "16", "--batch-size", "2", "--max-steps", "2",
            "--no-progress", "--out", str(art)]
    assert main(argv) == 0
    meta = json.loads((art / "attnshare.json").read_text())
    assert meta["plans"][0]["method"] == "postshare" and meta["plans"][0]["train_scope"] == "attention"
    assert json.loads((art / "train.json").read_text())["params saved"] == 2 * (2 * 16 + 2 * 16) * 64


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"reg_weight": -1.0}, "--reg-weight must be zero or positive"),
        ({"train_scope": "mlp"}, "--train-scope must be one of full, attention"),
        ({"data_term": "kl"}, "--data-term must be one of distill, lm"),
        ({"ratio": 1.0}, r"--ratio must be in \[0, 1\)"),
        ({"match": "qq"}, "Unknown match function"),
    ],
)
def test_bad_config_is_one_sentence(kw, message):
    with pytest.raises(AttnshareError, match=message):
        PostShareConfig(**kw)


# ------------------------------------------------------------------------------------- keep the better weights


def directshare_logits(arch_name: str, plan: PostSharePlan, ids) -> torch.Tensor:
    """Logits of untrained DirectShare with ``plan``'s pairs on a fresh copy of the base model."""
    from attnshare.methods.directshare import DirectSharePlan

    fresh = tiny_model(arch_name)
    attnshare.apply(fresh, DirectSharePlan(pairs=plan.pairs, match=plan.match, share_o=plan.share_o))
    return logits(fresh, ids)


def test_check_keeps_directshare_when_post_training_is_harmful(text, tmp_path):
    from safetensors.torch import load_file

    model = tiny_model("llama")
    plan = ps_plan(model, guard_tokens=64, train_scope="full", data_term="lm")
    result = attnshare.train(model, CharTokenizer(), plan, cfg(text, lr=50.0, max_steps=3))  # wrecks the weights
    assert result.metrics["kept_postshare"] == 0.0
    assert result.metrics["check_kl_postshare"] > result.metrics["check_kl_directshare"]
    ids = random_ids(2, 10, seed=5)
    assert torch.equal(logits(model, ids), directshare_logits("llama", plan, ids))  # exactly untrained DirectShare
    assert state_of(model).trained == set()
    out = attnshare.save(model, tmp_path / "art")
    stored = load_file(out / "params.safetensors") if (out / "params.safetensors").exists() else {}
    assert stored == {}  # nothing trained survives: the artifact is the plan on the base
    loaded, _ = attnshare.load(out, model=tiny_model("llama"))
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_check_decides_by_the_lower_held_out_kl(text):
    model = tiny_model("qwen2")
    plan = ps_plan(model, guard_tokens=64, data_term="distill")
    result = attnshare.train(model, CharTokenizer(), plan, cfg(text, lr=1e-3, max_steps=2))
    m = result.metrics
    assert m["kept_postshare"] == float(m["check_kl_postshare"] < m["check_kl_directshare"])
    assert bool(state_of(model).trained) == bool(m["kept_postshare"])


def test_post_training_skips_the_checks_tokens_of_the_calibration_text(monkeypatch):
    from attnshare.data import load_text, tokenize_text
    from attnshare.methods.postshare import method as ps_method

    seen = {}
    real_train = ps_method.train

    def spy(*args, **kwargs):
        seen["data"] = kwargs["data"]
        return real_train(*args, **kwargs)

    monkeypatch.setattr(ps_method, "train", spy)
    model = tiny_model("llama")
    plan = ps_plan(model, guard_tokens=32)
    attnshare.train(model, CharTokenizer(), plan, TrainConfig(text="plays", max_tokens=256, seq_len=16, batch_size=2,
                                                              max_steps=1, progress=False))
    skip = ps_method.GUARD_OFFSET + 32  # the planner's and the check's tokens come first in the calibration text
    expected = tokenize_text(CharTokenizer(), load_text("plays"), skip + 256)[skip:]
    assert torch.equal(seen["data"], expected) and seen["data"].numel() == 256


def test_pairs_scope_trains_only_the_paired_slices(text):
    from attnshare.methods.directshare.method import unit_slice

    model = tiny_model("qwen2")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = ps_plan(model, train_scope="pairs", data_term="distill")
    assert len(plan.pairs) == 2
    attnshare.train(model, CharTokenizer(), plan, cfg(text, max_steps=3))
    params = dict(model.named_parameters())
    bank = params[f"{BANK}.q"]  # (N, r, D): unique units of the changed layers, in (layer, unit) order
    roots = plan.roots_of(GROUP)
    unique = [(l, u) for l in plan.layers for u in range(2) if (l, u) not in roots]
    paired = {(l, u) for l, u, _, _ in plan.pairs} | set(roots.values())
    for row, (layer, unit) in enumerate(unique):
        original = unit_slice(base[f"model.layers.{layer}.self_attn.q_proj.weight"], "q", 2, unit)
        assert torch.equal(bank[row], original) == ((layer, unit) not in paired), (layer, unit)
    for name, p in params.items():  # everything outside the paired q/k/v slices is the base's
        if not name.startswith(BANK) and name in base:
            assert torch.equal(p, base[name]), name


def test_training_ids_skip_leading_tokens(tmp_path):
    from attnshare.methods.postshare.method import training_ids

    path = tmp_path / "t.txt"
    path.write_text("abcdefghijklmnopqrstuvwxyz", encoding="utf-8")
    ids = training_ids(CharTokenizer(), str(path), 4, skip=3)
    assert ids.tolist() == [ord(c) for c in "defg"]
    assert training_ids(CharTokenizer(), str(path), None, skip=20).tolist() == [ord(c) for c in "uvwxyz"]


def test_tied_scope_shares_first_then_trains_only_the_shared_slices(text, tmp_path):
    from safetensors.torch import load_file

    from attnshare.methods.directshare.method import bank_rows, unit_slice

    model = tiny_model("qwen2")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = ps_plan(model, train_scope="tied", data_term="distill")
    params_before = model.num_parameters()
    result = attnshare.train(model, CharTokenizer(), plan, cfg(text, max_steps=3))
    assert result.steps == 3 and "reg" not in result.metrics  # tied pairs share their slices: R is 0
    assert params_before - model.num_parameters() == 2 * ((2 * 16 + 2 * 16) * 64 + 2 * 16 + 2 * 16)
    params = dict(model.named_parameters())
    roots = set(plan.roots_of(GROUP).values())
    for (layer, unit), row in bank_rows(plan, GROUP, geometry(model)).items():
        for kind in "qkv":
            original = unit_slice(base[f"model.layers.{layer}.self_attn.{kind}_proj.weight"], kind, 2, unit)
            assert torch.equal(params[f"{BANK}.{kind}"][row], original) == ((layer, unit) not in roots), (layer, unit)
    for name, p in params.items():  # everything outside the shared slices is the base's
        if not name.startswith(BANK):
            assert torch.equal(p, base[name]), name
    out = attnshare.save(model, tmp_path / "art")
    assert all(k.startswith(BANK) for k in load_file(out / "params.safetensors"))
    ids = random_ids(1, 12)
    loaded, _ = attnshare.load(out, model=tiny_model("qwen2"))
    assert torch.equal(logits(loaded, ids), logits(model, ids))
