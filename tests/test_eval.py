"""Evaluation core: offline zero-shot proxies (items, batched scoring, PMI), the lm-eval adapter, `attnshare eval`."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from test_foundation import _tiny_tokenizer

from attnshare.cli import main
from attnshare.errors import AttnshareError
from attnshare.evaluate import proxies
from attnshare.evaluate.proxies import (
    PROXIES,
    continuation_scores,
    final_word_items,
    make_proxy_items,
    next_sentence_items,
    score_next_sentence,
    split_sentences,
)
from attnshare.evaluate.suite import EvalConfig, evaluate

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"]


def synthetic_text(num_sentences: int = 80) -> str:
    """Deterministic prose-like text: capitalised sentences of 7-12 words, with words that recur."""
    sentences = []
    for i in range(num_sentences):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(7 + i % 6)]
        sentences.append(" ".join(words).capitalize() + ".")
    return "# header line\n" + "\n".join(" ".join(sentences[k : k + 3]) for k in range(0, num_sentences, 3))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "prose.txt"
    path.write_text(synthetic_text())
    return path


# ---- items ------------------------------------------------------------------------------------------------------

def test_sentences_skip_markup_and_abbreviations():
    text = "### START: x ###\np.772:0\nMr. Smith met J. Jones here. Then they left!\nHor.\nWhy ask you this?"
    assert split_sentences(text) == ["Mr. Smith met J. Jones here.", "Then they left!", "Why ask you this?"]


def test_items_are_deterministic_and_model_free():
    text = synthetic_text()
    a, b = next_sentence_items(text, 20, seed=3), next_sentence_items(text, 20, seed=3)
    assert a == b and a != next_sentence_items(text, 20, seed=4)
    sentences = split_sentences(text)
    for item in a:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        truth = sentences[sentences.index(item.context.split(". ")[-1].rstrip(".") + ".") + 1]
        assert item.choices[item.label] == truth
    assert {item.label for item in a} == {0, 1, 2, 3}  # the answer is not always in one slot
    words = final_word_items(text, 20, seed=3)
    assert words == final_word_items(text, 20, seed=3)
    for item in words:
        assert item.target.lower() in item.context.lower() and not item.context.endswith(" ")


def test_too_short_text_and_unknown_proxy_are_one_sentence():
    with pytest.raises(AttnshareError, match=r"yields only \d+ next-sentence items, fewer than the 500 asked"):
        next_sentence_items(synthetic_text(), 500)
    with pytest.raises(AttnshareError, match=r"yields only \d+ final-word items, fewer than the 500 asked"):
        final_word_items(synthetic_text(), 500)
    with pytest.raises(AttnshareError, match="yields only 0 next-sentence items"):
        next_sentence_items("Too short. Really.", 1)
    with pytest.raises(AttnshareError, match=r"Unknown proxy task 'nope': use one of next_sentence, final_word\."):
        EvalConfig(proxies=["nope"])


# ---- scoring ----------------------------------------------------------------------------------------------------

def _reference_score(model, prefix: list[int], cont: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([prefix + cont])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids).logits[0, :-1].float(), -1)  # (T-1, V)
    lp = logprobs[len(prefix) - 1 :]  # (len(cont), V)
    target = torch.tensor(cont)
    return lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())


def test_batched_padded_scores_equal_one_by_one(arch):
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(0)
    requests = [(torch.randint(0, 128, (int(n),), generator=g).tolist(),
                 torch.randint(0, 128, (int(m),), generator=g).tolist())
                for n, m in zip(torch.randint(1, 20, (7,), generator=g), torch.randint(1, 6, (7,), generator=g))]
    batched = continuation_scores(model, requests, batch_size=4, progress=False)
    for (prefix, cont), (score, greedy) in zip(requests, batched):
        ref_score, ref_greedy = _reference_score(model, prefix, cont)
        assert score == pytest.approx(ref_score, abs=1e-4) and greedy == ref_greedy
    # a continuation that is the model's own greedy choice is reported as greedy
    prefix = requests[0][0]
    with torch.no_grad():
        nxt = model(torch.tensor([prefix])).logits[0, -1].argmax().item()
    assert continuation_scores(model, [(prefix, [nxt])], 1, progress=False)[0][1] is True


def test_long_prefix_is_cut_from_the_left_to_fit_the_context():
    model = tiny_model("llama")  # context 256
    prefix, cont = list(range(100)) * 3, [5, 6]
    (score, _), = continuation_scores(model, [(prefix, cont)], 1, progress=False)
    assert score == pytest.approx(_reference_score(model, prefix[-254:], cont)[0], abs=1e-4)


def test_next_sentence_picks_the_highest_pmi(monkeypatch):
    items = next_sentence_items(synthetic_text(), 6, seed=1)
    tok = _tiny_tokenizer()
    model = tiny_model("llama")
    shared_calls, prior_calls = [], []

    def fake_shared(model, prefix, continuations):  # the labelled choice gets a higher likelihood than its prior
        item = items[len(shared_calls)]
        shared_calls.append(len(continuations))
        return [-10.0 + 5.0 * (j == item.label) for j in range(len(continuations))]

    def fake_scores(model, requests, batch_size, progress=True, desc=""):
        prior_calls.append((len(requests), batch_size))
        return [(-20.0, False)] * len(requests)

    monkeypatch.setattr(proxies, "shared_prefix_scores", fake_shared)
    monkeypatch.setattr(proxies, "continuation_scores", fake_scores)
    res = score_next_sentence(model, tok, items, batch_size=2)
    assert res == {"accuracy": 1.0, "correct": 6, "items": 6, "chance": 0.25}
    distinct = len({c for item in items for c in item.choices})
    assert shared_calls == [4] * 6  # one context forward per item, its 4 candidates together
    assert prior_calls == [(distinct, 8)]  # each distinct candidate's prior scored once, batched


@pytest.mark.parametrize("method", ["base", "sa", "lisa"])
def test_shared_prefix_scores_equal_full_forwards(arch, method):
    """One prefix forward + its cache tiled over right-padded continuations == a fresh forward of each sequence,
    on every architecture and through SA's V-only and LiSA's low-rank cache slots."""
    import attnshare
    from attnshare.methods.lisa import LiSAPlan
    from attnshare.methods.sa import SAPlan

    model = tiny_model(arch, num_layers=4)
    if method == "sa":
        model = attnshare.apply(model, SAPlan(donors={2: 1}) if arch != "gemma3_text" else SAPlan(donors={3: 1}))
    if method == "lisa":
        model = attnshare.apply(model, LiSAPlan(layers=[2, 3], rank=4))
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 128, (11,), generator=g).tolist()
    conts = [torch.randint(0, 128, (int(m),), generator=g).tolist() for m in (3, 1, 6, 4)]
    scores = proxies.shared_prefix_scores(model, prefix, conts)
    for cont, score in zip(conts, scores):
        assert score == pytest.approx(_reference_score(model, prefix, cont)[0], abs=1e-4)


def test_evaluate_runs_both_proxies_on_a_tiny_model(arch, text_file):
    model, tok = tiny_model(arch), _tiny_tokenizer()
    config = EvalConfig(text=str(text_file), window=64, max_tokens=256, proxy_items=8, seed=2)
    result = evaluate(model, tok, config, progress=False)
    assert set(result.proxies) == set(PROXIES)
    for res in result.proxies.values():
        assert res["items"] == 8 and res["seed"] == 2 and 0 <= res["accuracy"] <= 1
        assert res["correct"] == round(res["accuracy"] * 8)
    assert math.isfinite(result.proxies["final_word"]["mean_logprob"])
    row = result.summary()
    assert row["windows"] == result.perplexity.windows and "next_sentence acc" in row and "final_word acc" in row
    # identical items for every model: a second model is scored on the same item set
    items = make_proxy_items(list(PROXIES), text_file.read_text(), 8, 2)
    assert items == make_proxy_items(list(PROXIES), text_file.read_text(), 8, 2)


# ---- CLI --------------------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("qwen2").save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder


def test_cli_eval_prints_proxy_accuracies_and_writes_json(tiny_folder, text_file, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(tiny_folder), "--text", str(text_file), "--window", "64", "--max-tokens",
                 "256", "--proxy-items", "6", "--proxies", "next_sentence", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "next_sentence acc" in table and "final_word" not in table
    data = json.loads(out.read_text())
    assert data["proxies"]["next_sentence"]["items"] == 6 and data["config"]["proxy_items"] == 6


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--proxy-items", "900"], "fewer than the 900 asked; use --proxy-items"),
        (["--proxies", "hellaswag"], "Unknown proxy task 'hellaswag'"),
        (["--proxy-items", "0", "--lm-eval-tasks", "x", "--lm-eval-include", "/nonexistent/tasks"], "include path '/nonexistent/tasks'"),
        (["--lm-eval-limit", "0", "--lm-eval-tasks", "x"], "--lm-eval-limit must be at least 1"),
    ],
)
def test_cli_eval_bad_input_is_one_sentence(tiny_folder, text_file, tmp_path, capsys, extra, message):
    out = tmp_path / "e.json"
    argv = ["eval", "--model", str(tiny_folder), "--text", str(text_file), "--window", "64", "--json", str(out)]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # above it: only progress bars of model loading
    assert err.startswith("error: ") and message in err
    assert not out.exists()


# ---- lm-eval adapter (offline, local task file) -----------------------------------------------------------------

TASK_YAML = """task: attnshare_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def local_task(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    folder = tmp_path / "tasks"
    folder.mkdir()
    rows = [{"question": "abc " * (i + 1), "choices": ["ab", "cd", "ef"], "label": i % 3} for i in range(6)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "local_mc.yaml").write_text(TASK_YAML.format(data=folder / "data.jsonl"))
    return folder, rows


def test_lm_eval_adapter_scores_an_in_memory_model_offline(local_task):
    from attnshare.evaluate.harness import lm_eval_tasks

    folder, rows = local_task
    model, tok = tiny_model("llama"), _tiny_tokenizer()
    res = lm_eval_tasks(model, tok, ["attnshare_local_mc"], include_path=str(folder), batch_size=2)
    metrics = res["metrics"]["attnshare_local_mc"]
    assert metrics["sample_len"] == 6
    # lm-eval's accuracy equals our own argmax over the choices' log-likelihoods (context + " " + choice)
    correct = 0
    for row in rows:
        prefix = tok(row["question"])["input_ids"]
        scores = [continuation_scores(model, [(prefix, tok(" " + c)["input_ids"])], 1, progress=False)[0][0]
                  for c in row["choices"]]
        correct += int(max(range(3), key=scores.__getitem__) == row["label"])
    assert metrics["acc"] == pytest.approx(correct / 6)


def test_missing_lm_eval_names_the_extra(monkeypatch, tmp_path):
    import sys

    from attnshare.evaluate.harness import lm_eval_tasks

    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)  # import fails as if lm-eval were not installed
    with pytest.raises(AttnshareError, match=r"pip install 'attnshare\[eval\]'"):
        lm_eval_tasks(tiny_model("llama"), _tiny_tokenizer(), ["any"], include_path=str(tmp_path))


def test_lm_eval_through_cli_and_unknown_task(local_task, tiny_folder, text_file, tmp_path, capsys, monkeypatch):
    import lm_eval.tasks

    folder, _ = local_task
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(tiny_folder), "--text", str(text_file), "--window", "64", "--max-tokens",
                 "128", "--proxy-items", "0", "--lm-eval-tasks", "attnshare_local_mc", "--lm-eval-include",
                 str(folder), "--json", str(out)]) == 0
    assert "attnshare_local_mc acc" in capsys.readouterr().out
    assert json.loads(out.read_text())["lm_eval"]["metrics"]["attnshare_local_mc"]["sample_len"] == 6
    # indexing lm-eval's built-in tasks takes minutes on 2 cores; the name check is the same without them
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager,
                                                                        include_defaults=False))
    assert main(["eval", "--model", str(tiny_folder), "--text", str(text_file), "--window", "64", "--proxy-items",
                 "0", "--lm-eval-tasks", "no_such_task", "--lm-eval-include", str(folder), "--json", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: Unknown lm-eval task(s) no_such_task")


# ---- real model -------------------------------------------------------------------------------------------------

@pytest.mark.real
def test_real_model_next_sentence_beats_chance(real_model):
    from attnshare.data import load_text

    model, tok = real_model
    items = next_sentence_items(load_text("britannica"), 24, seed=0)
    res = score_next_sentence(model, tok, items, batch_size=4, progress=False)
    assert res["items"] == 24 and res["accuracy"] >= 0.4  # chance 0.25; full 200-item numbers in docs/results
