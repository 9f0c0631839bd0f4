"""Parity helpers shared by the method tests."""

from __future__ import annotations

import torch


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def greedy_no_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Step-by-step argmax decoding, re-running the full sequence each step without a cache."""
    out = ids
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(out, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
    return out


def greedy_generate(model, ids: torch.Tensor, steps: int, **kw) -> torch.Tensor:
    """Cached greedy ``generate`` of exactly ``steps`` tokens (``kw``: e.g. ``cache_implementation="static"``)."""
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            pad_token_id=0, eos_token_id=None, **kw,
        )


def random_ids(batch: int, length: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- cache access that reads the same on every supported transformers release (5.24 renamed the cache keyword and
# the output field from ``past_key_values`` to ``cache``). Written here, independent of the library under test.

CACHE_NAMES = ("cache", "past_key_values")


def cache_keyword(model) -> str:
    """The keyword under which ``model``'s forward takes a cache ('cache' from transformers 5.24 on)."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def output_cache(output):
    """The cache of a model output, from whichever field the installed transformers declares."""
    for name in CACHE_NAMES:
        if name in output.keys():  # noqa: SIM118 (ModelOutput: only the fields that were set)
            return output[name]
    return None


def cached_forward(model, ids: torch.Tensor, cache=None, **kw):
    """``(logits, cache)`` of a forward with ``use_cache=True``, continuing ``cache`` when given."""
    extra = {cache_keyword(model): cache} if cache is not None else {}
    with torch.no_grad():
        out = model(ids, use_cache=True, **extra, **kw)
    return out.logits, output_cache(out)


def cache_layer_bytes(cache) -> list[int]:
    """Bytes of each cache slot's key and value tensors (a zero-width K counts 0), read off the tensors."""
    return [
        sum(t.numel() * t.element_size() for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
            if isinstance(t, torch.Tensor))
        for layer in cache.layers
    ]


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D id tensors into a batch: ``(ids, attention_mask)``, each (B, max length)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def tiny_tokenizer():
    """A 27-token character tokenizer (a..z, <unk>) for tiny checkpoints that must load with a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(97 + i): i for i in range(26)} | {"<unk>": 26}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")


def teacher_kl(model, teacher, ids) -> float:
    """KL(teacher || model) of next-token distributions on ids (B,T), mean over the batch."""
    s, t = logits(model, ids).log_softmax(-1), logits(teacher, ids).log_softmax(-1)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean").item()
