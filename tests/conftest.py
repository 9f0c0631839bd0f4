"""Shared fixtures: tiny random models of every supported architecture, built in-process (no network)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models: threads only add overhead (and contention on 2 cores)

ARCH_NAMES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "olmo2", "granite"]
# Families with a tiny config that the whole contract cannot run on, each tested in tests/test_families.py: Gemma-2
# has no SDPA in transformers (attnshare.load_model's default); Phi-3 fuses q/k/v, so only drop/layerdrop apply.
OTHER_ARCHS = ["gemma2", "phi3"]
ROOT = Path(__file__).resolve().parents[1]


def run_worker(worker: Path, *args: str, processes: int = 1, **env: str) -> None:
    """Run a test worker script with ``args``: as ``processes`` gloo CPU processes through ``accelerate launch``, or
    as one plain process; ``env`` adds environment variables. Fails the test with the worker's stderr."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", **env}
    launch = [sys.executable]
    if processes > 1:
        with socket.socket() as s:  # a free port for the process group
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launch += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(port)]
    done = subprocess.run([*launch, str(worker), *args], env=env, capture_output=True, text=True, timeout=180,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]


def tiny_config(arch: str, num_layers: int = 4):
    """A tiny config with GQA (H=4, Hkv=2); Gemma2/3 alternate sliding and full layers.

    OLMo-2 norms q and k over the whole projection width; Granite (no record in attnshare.arch: its layout is found
    from its modules) scales scores by ``attention_multiplier`` instead of 1/sqrt(d); Gemma-2 soft-caps attention
    logits (a small cap, so that it matters at random initialisation); Phi-3 fuses q/k/v into one ``qkv_proj``.
    """
    import transformers

    common = {
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": num_layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False,
    }
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    tokens = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # defaults outside the tiny vocabulary
    made = {
        "llama": ("LlamaConfig", {}),
        "mistral": ("MistralConfig", {"sliding_window": None}),
        "qwen2": ("Qwen2Config", {}),
        "qwen3": ("Qwen3Config", {"head_dim": 16}),
        "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 8, "layer_types": types,
                                             "query_pre_attn_scalar": 16}),
        "olmo2": ("Olmo2Config", tokens),
        "granite": ("GraniteConfig", {"attention_multiplier": 0.1}),
        "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 8, "layer_types": types,
                                    "query_pre_attn_scalar": 16, "attn_logit_softcapping": 0.05}),
        "phi3": ("Phi3Config", tokens),
    }
    name, extra = made[arch]
    return getattr(transformers, name)(**common, **extra)


def tiny_model(arch: str, num_layers: int = 4, seed: int = 0, attn_implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch, num_layers), attn_implementation=attn_implementation, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(autouse=True)
def float32_measurements(monkeypatch):
    """Planners measure in float32 on every test machine: on tiny random models a plan's KL (~1e-7) is the size of
    bf16 rounding, so "auto" would make plans depend on whether the CPU has native bf16. A test that wants bf16
    sets it explicitly (or patches this back)."""
    from attnshare.analysis import sensitivity

    monkeypatch.setattr(sensitivity, "fast_bfloat16", lambda device: False)


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
