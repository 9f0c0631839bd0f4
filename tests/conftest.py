"""Shared fixtures: tiny random models of every supported architecture, built in-process (no network)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # tiny models: threads only add overhead (and contention on 2 cores)

ARCH_NAMES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]


def tiny_config(arch: str, num_layers: int = 4):
    """A tiny config with GQA (H=4, Hkv=2); Gemma3 alternates sliding and full layers."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = {
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": num_layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False,
    }
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    if arch == "gemma3_text":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=8, layer_types=types, query_pre_attn_scalar=16)
    raise KeyError(arch)


def tiny_model(arch: str, num_layers: int = 4, seed: int = 0, attn_implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch, num_layers), attn_implementation=attn_implementation, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(params=ARCH_NAMES)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M (full 30 layers), loaded once per test session."""
    from attnshare.models import load_model

    return load_model("smollm2-135m")


def tiny_checkpoint(folder, arch: str, num_layers: int = 4, seed: int = 0):
    """Write ``tiny_model(arch)`` and a tiny tokenizer to ``folder`` as a plain HF checkpoint; returns the folder.

    Loaded with ``attnshare.load_model(folder)`` the model's identity names the folder, so an artifact reloads its
    base by itself and freed weights can be restored by :func:`attnshare.unapply`.
    """
    from helpers import tiny_tokenizer

    tiny_model(arch, num_layers, seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
