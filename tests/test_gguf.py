"""GGUF files as --model: tiny F32 GGUFs written with the gguf package's writer (a Llama and a Qwen3, which has q/k
norms) convert once into the cache, load with the logits of the model they were written from, reuse the cache, carry
their identity into artifacts, and bad files are answered with one sentence before any slow work."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_checkpoint

import attnshare
from attnshare.cli import main
from attnshare.cli.common import check_model_args
from attnshare.errors import AttnshareError
from attnshare.models import gguf_file, loading

gguf = pytest.importorskip("gguf")  # comes with transformers' gguf extra (pyproject: gguf>=0.10)

# a byte-level BPE vocabulary of 32 tokens: letters, the space marker and four merges
TOKENS = ["<|endoftext|>"] + [chr(c) for c in range(97, 123)] + ["\u0120", "th", "\u0120t", "he", "\u0120the"]
MERGES = ["t h", "\u0120 t", "h e", "\u0120t he"]
HF_NAMES = {  # GGUF tensor name inside a block -> HF parameter name inside a decoder layer
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
IDS = torch.tensor([[1, 2, 3, 4, 5, 27, 28, 29, 30, 31, 0, 7]])


def tiny_hf(arch: str, seed: int = 0):
    """A tiny model on the GGUF vocabulary: GQA (4 query, 2 key/value heads); the Qwen3 one with head_dim 16 (not
    hidden/heads, which transformers' GGUF reader would assume) and tied embeddings, as the small Qwen3 models have."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    common = {"vocab_size": len(TOKENS), "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    if arch == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=False)
    else:
        config = Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for Llama (rotary halves interleaved), which transformers undoes on load."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: Path, arch: str, *, tokenizer: bool = True) -> Path:
    """``model`` as an all-F32 GGUF file the way llama.cpp's converter lays it out, with a tiny tokenizer."""
    c = model.config
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(TOKENS)
        w.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(TOKENS) - 1))
        w.add_token_merges(MERGES)
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
        w.add_pad_token_id(1)  # not the eos: the converted tokenizer must take the file's own (5.17 dropped it)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        for g, h in HF_NAMES.items():
            if (t := sd.get(f"model.layers.{i}.{h}.weight")) is None:
                continue
            if arch == "llama" and g in ("attn_q", "attn_k"):
                t = _permute(t, heads if g == "attn_q" else kv)
            w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good GGUFs (llama, qwen3) with their source models, and bad ones."""
    root = tmp_path_factory.mktemp("gguf")
    out: dict = {}
    for arch in ("llama", "qwen3"):
        out[f"{arch}_model"] = tiny_hf(arch)
        out[arch] = write_gguf(out[f"{arch}_model"], root / f"tiny-{arch}.gguf", arch)
    good = out["llama"].read_bytes()

    def file(name: str, content: bytes) -> None:
        out[name] = root / f"{name}.gguf"
        out[name].write_bytes(content)

    file("notgguf", b"PK\x03\x04 this is a zip, not a gguf" * 10)
    file("trunc_data", good[:-100])
    file("trunc_header", good[:40])
    file("empty", b"")
    file("badversion", b"GGUF" + (7).to_bytes(4, "little") + bytes(16))
    out["notok"] = write_gguf(out["llama_model"], root / "notok.gguf", "llama", tokenizer=False)
    rwkv = gguf.GGUFWriter(str(root / "rwkv.gguf"), "rwkv6")  # a recurrent model: nothing to share
    rwkv.add_block_count(2)
    rwkv.add_tokenizer_model("gpt2")
    rwkv.add_token_list(TOKENS)
    rwkv.add_tensor("token_embd.weight", np.zeros((len(TOKENS), 8), dtype=np.float32))
    rwkv.write_header_to_file()
    rwkv.write_kv_data_to_file()
    rwkv.write_tensors_to_file()
    rwkv.close()
    out["rwkv"] = root / "rwkv.gguf"
    (root / "one").mkdir()
    shutil.copy(out["llama"], root / "one" / "model.gguf")
    out["one"] = root / "one"
    (root / "two").mkdir()
    shutil.copy(out["llama"], root / "two" / "a.gguf")
    shutil.copy(out["qwen3"], root / "two" / "b.gguf")
    out["two"] = root / "two"
    return out


@pytest.fixture(autouse=True)
def cache(request, tmp_path, monkeypatch) -> Path:
    """Every test converts into its own empty cache (the real-model test uses the user's, as the embedded model does)."""
    if request.node.get_closest_marker("real"):
        return None
    monkeypatch.setenv("ATTNSHARE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def no_hash(path):
    raise AssertionError(f"hashed {path} again")


def no_conversion(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_file, "convert_gguf", refuse)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gguf_converts_once_and_matches_its_source(files, arch, cache, monkeypatch):
    model, tok = attnshare.load_model(str(files[arch]))
    assert model.config.model_type == arch
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, files[f"{arch}_model"](IDS).logits, rtol=0, atol=1e-5)
    assert tok.convert_ids_to_tokens(tok("the heth").input_ids) == ["th", "e", "\u0120", "he", "th"]
    assert tok.pad_token_id == 1
    from transformers import AutoTokenizer

    direct = AutoTokenizer.from_pretrained(files[arch].parent, gguf_file=files[arch].name)  # transformers' own reading
    for text in ("the heth", " the the", "hello there"):
        assert tok(text).input_ids == direct(text).input_ids
        assert tok.decode(tok(text).input_ids) == direct.decode(direct(text).input_ids)

    sha = gguf_file.file_sha256(files[arch])
    folder = cache / "gguf" / sha[:16]
    (converted,) = folder.iterdir()  # one conversion, keyed by content hash, then transformers version
    assert converted.name.startswith("transformers-")
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", gguf_file.SOURCE_JSON} <= names
    assert not [p for p in folder.parent.rglob(".*") if p.is_dir()], "a temporary folder was left behind"
    assert json.loads((converted / gguf_file.SOURCE_JSON).read_text())["source"] == str(files[arch].resolve())

    identity = attnshare.model_identity(model)
    assert identity["base_model"] == str(files[arch].resolve()) and identity["gguf_sha256"] == sha

    no_conversion(monkeypatch)  # the second load (and a copy under another name: same content) reads the cache
    copy = cache.parent / "renamed.gguf"
    shutil.copy(files[arch], copy)
    real_hash = gguf_file._sha256
    for source in (files[arch], copy):
        # the unchanged file is not even hashed again; the copy is (a new path), and finds the same conversion
        monkeypatch.setattr(gguf_file, "_sha256", real_hash if source == copy else no_hash)
        again, _ = attnshare.load_model(str(source), num_layers=2)
        assert again.config.num_hidden_layers == 2
        torch.testing.assert_close(again.model.embed_tokens.weight, model.model.embed_tokens.weight, rtol=0, atol=0)
    assert len(list((cache / "gguf").iterdir())) == 2  # hashes.json and the one conversion


def test_folder_with_one_gguf_loads(files, monkeypatch):
    model, _ = attnshare.load_model(str(files["one"]))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, files["llama_model"](IDS).logits, rtol=0, atol=1e-5)


def test_embedded_model_goes_through_the_same_conversion(monkeypatch, tmp_path):
    spec = loading.EMBEDDED["smollm2-135m"]
    monkeypatch.setattr(loading, "_gguf_folder", lambda s: tmp_path)
    seen = []
    monkeypatch.setattr(loading, "gguf_checkpoint", lambda path: (seen.append(path), (tmp_path / "conv", "0" * 64))[1])
    assert loading.embedded_path("smollm2-135m") == tmp_path / "conv"
    assert seen == [tmp_path / spec.gguf_file]


def test_artifact_on_a_gguf_base_reloads_from_the_file_or_the_cache(files, tmp_path, monkeypatch):
    from attnshare.methods.sa.plan import SAPlan

    source = tmp_path / "mine.gguf"
    shutil.copy(files["llama"], source)
    model, _ = attnshare.load_model(str(source))
    shared = attnshare.apply(model, SAPlan(donors={2: 1}))
    with torch.no_grad():
        want = shared(IDS).logits
    art = attnshare.save(shared, tmp_path / "art")
    meta = json.loads((art / "attnshare.json").read_text())
    assert meta["base"]["base_model"] == str(source.resolve()) and "gguf_sha256" in meta["base"]

    no_conversion(monkeypatch)
    for gone in (False, True):
        if gone:  # the GGUF file is gone: the base comes from its cached conversion
            source.unlink()
        check_model_args(argparse.Namespace(model=str(art), num_layers=None))  # the CLI's early check agrees
        again, tok = attnshare.load_model(str(art))
        with torch.no_grad():
            torch.testing.assert_close(again(IDS).logits, want, rtol=0, atol=0)
        assert tok is not None and tok("the").input_ids == [28, 5]


def test_supported_architectures_are_converted_by_transformers_and_shared_by_attnshare():
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    from attnshare.arch import arch_of

    supported = gguf_file.supported_architectures()
    assert {"llama", "qwen3"} <= set(supported)  # the two tested here
    for gguf_arch in supported:
        assert gguf_arch in GGUF_CONFIG_MAPPING, gguf_arch
        arch_of(AutoConfig.for_model(gguf_file.GGUF_ARCHITECTURES[gguf_arch]))


def test_header_is_read_without_the_tensor_data(files):
    header = gguf_file.check_gguf(files["qwen3"])
    assert (header.architecture, header.num_layers, header.version) == ("qwen3", 4, 3)
    assert header.metadata["qwen3.attention.key_length"] == 16 and header.metadata["tokenizer.ggml.tokens"] == 32
    assert header.data_end == files["qwen3"].stat().st_size
    assert header.tensors["blk.0.attn_q.weight"] == ((64, 64), 0)  # (out, in) = (4 heads x 16, hidden 64), F32


# ---- bad files: one sentence, exit 2, before any conversion --------------------------------------------------------

BAD = [
    ("not-a-gguf", "eval --model {notgguf}", r"is not a GGUF file \(it does not start with the GGUF magic"),
    ("empty-gguf", "generate --model {empty} --prompt the", r"is not a GGUF file"),
    ("truncated-data", "eval --model {trunc_data}",
     r"trunc_data\.gguf' is truncated \(\d+ bytes, but its tensors need \d+\); copy or download it again\.$"),
    ("truncated-header", "apply --model {trunc_header} --method sa --receivers 2 --out {out}",
     r"is truncated \(it ends inside its header, after 40 bytes\)"),
    ("gguf-version", "eval --model {badversion}", r"is format version 7; attnshare reads GGUF versions 2 and 3"),
    ("unsupported-arch", "eval --model {rwkv}",
     r"holds a 'rwkv6' model, which attnshare cannot convert and share; supported GGUF architectures: .*llama.*qwen3"),
    ("no-tokenizer", "eval --model {notok}", r"has no tokenizer in its metadata"),
    ("several-ggufs", "eval --model {two}",
     r"folder '.*two' holds 2 \.gguf files \(a\.gguf, b\.gguf\); give the path of the one to load\.$"),
    ("num-layers-over-gguf", "eval --model {llama} --num-layers 5", r"--num-layers 5 is more than the 4 layers"),
]


@pytest.mark.parametrize("argv, message", [pytest.param(a, m, id=i) for i, a, m in BAD])
def test_bad_gguf_is_one_sentence(files, argv, message, tmp_path, cache, capsys, monkeypatch):
    no_conversion(monkeypatch)
    out = tmp_path / "out"
    names = {k: str(v) for k, v in files.items() if isinstance(v, Path)}
    assert main(argv.format(out=out, **names).split() + (["--json", str(out / "e.json")] if "eval" in argv else [])) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("."), lines
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists() and not cache.exists(), "a failing command left files behind"


def test_bad_gguf_through_the_library(files):
    with pytest.raises(AttnshareError, match=r"is not a GGUF file"):
        attnshare.load_model(str(files["notgguf"]))
    with pytest.raises(AttnshareError, match=r"holds 2 \.gguf files"):
        attnshare.load_model(str(files["two"]))
    assert gguf_file.find_gguf(files["one"].parent / "nothing-here") is None


def test_gguf_missing_a_tensor_is_refused_not_filled_at_random(files, tmp_path, monkeypatch):
    monkeypatch.setitem(HF_NAMES, "ffn_norm", "no_such_weight")  # write no post-attention norms
    path = write_gguf(files["llama_model"], tmp_path / "missing.gguf", "llama")
    with pytest.raises(AttnshareError, match=r"lacks the tensors of 4 weights of its model \(such as "
                                             r"model\.layers\.0\.post_attention_layernorm\.weight\)"):
        attnshare.load_model(str(path))


def test_cli_runs_on_a_gguf(files, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the thethe heth " * 200)
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(files["qwen3"]), "--text", str(text), "--window", "64", "--max-tokens", "256",
                 "--proxy-items", "0", "--json", str(out)]) == 0
    ppl = json.loads(out.read_text())["perplexity"]["ppl"]
    assert 1 < ppl < 2 * len(TOKENS)  # a random tiny model: about the vocabulary size
    assert main(["generate", "--model", str(files["llama"]), "--prompt", "the", "--max-new-tokens", "3"]) == 0


@pytest.mark.real
def test_real_gguf_path_is_the_embedded_model(real_model):
    """``--model <the embedded model's own .gguf>`` is the embedded model: same conversion, same logits."""
    import importlib.util

    spec = loading.EMBEDDED["smollm2-135m"]
    found = importlib.util.find_spec(spec.package)
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    embedded, tok = real_model
    assert tok.pad_token == "<|im_end|>"  # the file's tokenizer.ggml.padding_token_id (2), on every transformers
    model, _ = attnshare.load_model(str(path))  # the same file: the embedded model's own cached conversion
    ids = tok("The plays of Shakespeare were printed in quarto.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, embedded(ids).logits, rtol=0, atol=0)


def test_tokenizer_without_a_pad_token_pads_with_its_eos(tmp_path):
    """A checkpoint whose tokenizer names no pad token still takes batched prompts: its eos pads (masked anyway)."""
    _, tok = attnshare.load_model(str(tiny_checkpoint(tmp_path / "tiny", "llama")))
    assert tok.pad_token == tok.eos_token == "<unk>"
    assert tok(["ab", "abcd"], padding=True, return_tensors="pt").input_ids.shape == (2, 4)
