"""Training text sampled from the teacher itself (``--text teacher``), generated once per model and cached.

Distillation only needs inputs on which the student should behave like the teacher; the teacher's own samples
cover what it models (modern prose, code, lists), where a fixed corpus covers one style (the corpus' plays are
Elizabethan verse). Each sample is one block: a start token, then ``seq_len - 1`` tokens drawn from the teacher's
full next-token distribution at temperature 1 (no top-k / top-p, end-of-text tokens kept: the teacher goes on with
a new document, as in its pre-training windows). Samples depend on the model, its dtype, the seed, the block count
and length; they are cached under ``<cache>/samples`` and written in one rename.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import AttnshareError
from ..hf_compat import new_cache, with_cache
from ..models.loading import model_identity
from ..paths import cache_dir, write_file
from ..progress import progress_bar

log = logging.getLogger(__name__)

TEACHER_TEXT = "teacher"  # the training text name that asks for teacher samples
SAMPLER_VERSION = 1  # part of the cache key: bump when the sampling procedure changes
SAMPLE_BATCH = 128  # rows decoded together (measured: 119 tokens/s for SmolLM2-135M on the 2-core Zen 1 box)


def start_token(tokenizer) -> int:
    """The token each sample starts from: the tokenizer's BOS, else its EOS (what separates documents)."""
    for name in ("bos_token_id", "eos_token_id"):
        token = getattr(tokenizer, name, None)
        if isinstance(token, int):
            return token
    raise AttnshareError("Sampling training text from the teacher needs a tokenizer with a BOS or EOS token; "
                         "train on a named text or a text file instead (--text).")


@torch.no_grad()
def sample_rows(model, start: int, rows: int, length: int, generator: torch.Generator, bar=None) -> torch.Tensor:
    """``rows`` samples of ``length`` tokens, (rows, length): ``start`` then ancestral sampling at temperature 1,
    decoding with a KV cache (one token per row per step)."""
    device = next(model.parameters()).device
    ids = torch.full((rows, 1), start, dtype=torch.long, device=device)  # (rows, 1)
    cache, out = new_cache(model), [ids]
    for _ in range(length - 1):
        logits = model(input_ids=ids, use_cache=True, **with_cache(model, cache)).logits[:, -1]  # (rows, V)
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        ids = torch.multinomial(probs, 1, generator=generator).to(device)  # (rows, 1)
        out.append(ids)
        if bar is not None:
            bar.update(rows)
    return torch.cat(out, dim=1).cpu()  # (rows, length)


def samples_path(model, rows: int, length: int, seed: int) -> Path:
    """Where the samples of ``model`` for these settings are cached."""
    identity = model_identity(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    key = f"{identity['base_model']}|{identity['fingerprint']}|{dtype}|{rows}x{length}|{seed}|v{SAMPLER_VERSION}"
    name = f"{Path(str(identity['base_model'])).name or 'model'}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    return cache_dir() / "samples" / f"{name}.safetensors"


def _cached(path: Path, rows: int, length: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        ids = load_file(str(path)).get("input_ids")
    except (SafetensorError, OSError) as e:
        log.warning("Ignoring the unreadable teacher samples %s (%s); sampling them again", path, e)
        return None
    return ids if ids is not None and tuple(ids.shape) == (rows, length) else None


def teacher_samples(teacher, tokenizer, tokens: int, length: int, seed: int = 0, *, batch: int = SAMPLE_BATCH,
                    progress: bool = True) -> torch.Tensor:
    """At least ``tokens`` tokens sampled from ``teacher`` as (N, length) blocks, N = ceil(tokens / length); read
    from the cache when these samples were drawn before, else drawn (minutes on a CPU) and cached."""
    if length < 2 or tokens < length:
        raise AttnshareError(f"Teacher samples need at least one block: {tokens} tokens in blocks of {length}; "
                             "raise --teacher-tokens to at least --seq-len.")
    rows = -(-tokens // length)
    path = samples_path(teacher, rows, length, seed)
    ids = _cached(path, rows, length)
    if ids is not None:
        log.info("teacher samples: %d x %d tokens from %s", rows, length, path)
        return ids
    start, began = start_token(tokenizer), time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    was_training = teacher.training
    teacher.eval()
    try:
        with progress_bar(total=rows * (length - 1), desc="teacher samples", unit="tok", show=progress) as bar:
            ids = torch.cat([sample_rows(teacher, start, min(batch, rows - i), length, generator, bar)
                             for i in range(0, rows, batch)])  # (rows, length)
    finally:
        teacher.train(was_training)
    seconds = time.perf_counter() - began
    try:
        write_file(path, lambda tmp: save_file({"input_ids": ids.contiguous()}, tmp,
                                               metadata={"seed": str(seed), "seconds": f"{seconds:.1f}"}))
    except OSError as e:  # a read-only cache still trains; it only samples again next time
        log.warning("Could not cache the teacher samples in %s: %s", path, e)
    log.info("teacher samples: %d x %d tokens drawn in %.0f s (%.0f tokens/s), cached in %s", rows, length, seconds,
             rows * (length - 1) / max(seconds, 1e-9), path)
    return ids
