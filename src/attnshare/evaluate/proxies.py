"""Offline zero-shot proxies generated deterministically from a text (SPEC §4, §6).

Two tasks, registered by name in :data:`PROXIES`:
    next_sentence  4-way choice of the sentence that follows a context; the true next sentence against three
                   sentences drawn from elsewhere in the same text, scored by PMI, log p(c|ctx) - log p(c)
                   (chance 25%)
    final_word     LAMBADA-style: greedy prediction of a passage's final word; the passage is cut just before
                   a content word that already occurred earlier in the passage, so the wider context is needed

Items are plain strings built from the text, the seed and the item count only, never from a model or tokenizer,
so a base model and a shared model are always scored on identical items.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import AttnshareError
from ..hf_compat import output_cache, tile_cache, with_cache
from ..progress import progress_bar

NUM_CHOICES = 4
CONTEXT_SENTENCES = 2  # sentences of context before a next-sentence item (measured: 1 -> 52.5%, 2 -> 59.0% on SmolLM2)
PASSAGE_SENTENCES = 2  # sentences before the final sentence of a final-word passage
MIN_WORDS, MAX_WORDS = 6, 30  # sentence lengths eligible as answers or passage ends
MIN_DISTANCE = 4  # distractors come from at least this many sentences away from the answer

_ABBREVIATIONS = {"mr", "mrs", "dr", "st", "vol", "viz", "cf", "ed", "eds", "pp", "p", "no", "ch", "ibid", "esp",
                  "i.e", "e.g", "etc", "sc", "act", "ll", "fol", "vols"}
_MARKUP_LINE = re.compile(r"^\s*(#.*|p\.\d+:\d+|\[.*\]|[A-Z][A-Za-z]*( [A-Z][A-Za-z]*)?\.)\s*$")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z])")
_PLAIN_WORD = re.compile(r"^[\"'(]?[A-Za-z][a-z'’-]*[,;:.!?\"')]*$")
_TARGET_WORD = re.compile(r"(?<=\s)[A-Za-z]{3,}(?=[,;:.!?\"')]*(\s|$))")
_STOPWORDS = {"the", "and", "that", "this", "with", "for", "not", "but", "was", "are", "his", "her", "him", "you",
              "they", "them", "have", "has", "had", "from", "which", "what", "there", "then", "than", "thee",
              "thou", "thy", "shall", "will", "would", "all", "one", "our", "your", "its", "she", "who", "out"}


# ---- text -> sentences (pure) ------------------------------------------------------------------------------------

def clean_lines(text: str) -> str:
    """The text with markup lines dropped (``#`` headers, page markers, stage directions, speaker tags), one line."""
    kept = [line for line in text.splitlines() if not _MARKUP_LINE.match(line)]
    return " ".join(" ".join(kept).split())


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` in order: split after . ! ? before a capital, not after common abbreviations."""
    flat = clean_lines(text)
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(flat):
        before = flat[start : match.start()].rsplit(" ", 1)[-1].lower().lstrip("(\"'")
        if before in _ABBREVIATIONS or len(before) == 1:  # "Mr. Smith", initials "J. Smith"
            continue
        sentences.append(flat[start : match.end()].strip())
        start = match.end()
    tail = flat[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _eligible(sentence: str) -> bool:
    """Prose of moderate length: mostly plain words (drops OCR noise and bibliography lists)."""
    words = sentence.split()
    plain = sum(bool(_PLAIN_WORD.match(w)) for w in words)
    return MIN_WORDS <= len(words) <= MAX_WORDS and plain >= 0.85 * len(words)


# ---- items (pure: text, count, seed) ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class WordItem:
    context: str  # the passage up to (not including) the space before the final word
    target: str  # the final word, without punctuation


def _too_short(task: str, found: int, asked: int, text_name: str) -> AttnshareError:
    return AttnshareError(
        f"The text '{text_name}' yields only {found} {task} items, fewer than the {asked} asked; use "
        f"--proxy-items {found} or less, or a longer text."
    )


def next_sentence_items(text: str, num_items: int, seed: int = 0, text_name: str = "text") -> list[ChoiceItem]:
    """``num_items`` 4-way next-sentence items; distractors are other sentences of the same text."""
    sentences = split_sentences(text)
    pool = [i for i, s in enumerate(sentences) if _eligible(s)]
    positions = [i for i in pool if i >= CONTEXT_SENTENCES]
    if len(positions) < num_items or len(pool) < 2 * MIN_DISTANCE + NUM_CHOICES:
        raise _too_short("next-sentence", len(positions) if len(pool) >= 2 * MIN_DISTANCE + NUM_CHOICES else 0,
                         num_items, text_name)
    rng = random.Random(seed)
    items = []
    for i in rng.sample(positions, num_items):
        answer = sentences[i]
        others = list(dict.fromkeys(sentences[j] for j in pool if abs(j - i) >= MIN_DISTANCE and sentences[j] != answer))
        distractors = rng.sample(others, NUM_CHOICES - 1)
        label = rng.randrange(NUM_CHOICES)
        choices = distractors[:label] + [answer] + distractors[label:]
        items.append(ChoiceItem(" ".join(sentences[i - CONTEXT_SENTENCES : i]), tuple(choices), label))
    return items


def final_word_items(text: str, num_items: int, seed: int = 0, text_name: str = "text") -> list[WordItem]:
    """``num_items`` passages cut before the last content word of a sentence that already occurred in the passage."""
    sentences = split_sentences(text)
    candidates = []
    for i in range(PASSAGE_SENTENCES, len(sentences)):
        if not _eligible(sentences[i]):
            continue
        before = " ".join(sentences[i - PASSAGE_SENTENCES : i])
        for match in reversed(list(_TARGET_WORD.finditer(sentences[i]))):
            word = match.group()
            context = f"{before} {sentences[i][: match.start()].rstrip()}"
            if word.lower() not in _STOPWORDS and re.search(rf"\b{word}\b", context, flags=re.IGNORECASE):
                candidates.append(WordItem(context, word))
                break
    if len(candidates) < num_items:
        raise _too_short("final-word", len(candidates), num_items, text_name)
    return random.Random(seed).sample(candidates, num_items)


# ---- scoring ----------------------------------------------------------------------------------------------------

def fit_prefix(model, prefix: list[int], continuations: Sequence[list[int]]) -> list[int]:
    """``prefix`` cut from the left so that the longest continuation still fits the model's context; refuses an
    empty prefix or continuation."""
    if not prefix or not all(continuations):
        raise AttnshareError("A proxy request has an empty prefix or continuation; use a text with longer sentences.")
    limit = getattr(model.config, "max_position_embeddings", None) or 10**9
    return prefix[-max(1, limit - max(map(len, continuations))):]


def continuation_scores(model, requests: Sequence[tuple[list[int], list[int]]], batch_size: int,
                        progress: bool = True, desc: str = "score") -> list[tuple[float, bool]]:
    """For each (prefix ids, continuation ids): summed log p(continuation | prefix) and whether greedy decoding
    reproduces it. Requests are length-sorted, right-padded and batched; prefixes are cut from the left to fit."""
    limit = getattr(model.config, "max_position_embeddings", None) or 10**9
    device = next(model.parameters()).device
    seqs = [(fit_prefix(model, prefix, [cont]) + cont)[-limit:] for prefix, cont in requests]
    order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    with torch.inference_mode():
        batches = range(0, len(order), batch_size)
        for start in progress_bar(batches, desc=desc, unit="batch", show=progress, leave=False):
            batch = order[start : start + batch_size]
            width = len(seqs[batch[0]])
            ids = torch.zeros(len(batch), width, dtype=torch.long)  # (b, T), right-padded
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, k in enumerate(batch):
                ids[row, : len(seqs[k])] = torch.tensor(seqs[k])
                mask[row, : len(seqs[k])] = 1
            spans = [(len(seqs[k]) - len(requests[k][1]) - 1, len(seqs[k]) - 1) for k in batch]  # predicting positions
            keep = torch.tensor(sorted({t for lo, hi in spans for t in range(lo, hi)}))  # (K,) union over rows
            where = {int(t): j for j, t in enumerate(keep)}
            logits = model(ids.to(device), attention_mask=mask.to(device), use_cache=False,
                           logits_to_keep=keep.to(device)).logits.float()  # (b, K, V): only positions that are scored
            for row, k in enumerate(batch):
                lo, hi = spans[row]
                target = ids[row, lo + 1 : hi + 1].to(device)  # (m,): position t predicts token t+1
                lp = F.log_softmax(logits[row, where[lo] : where[lo] + hi - lo], dim=-1)  # (m, V)
                out[k] = (lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all()))
    return out


def shared_prefix_scores(model, prefix: list[int], continuations: Sequence[list[int]]) -> list[float]:
    """Summed log p(continuation | prefix) for each continuation. The prefix runs once; its cache is tiled over the
    continuations, which then run as one right-padded batch (what a fresh forward of each prefix + continuation
    computes, for a fraction of the tokens)."""
    device = next(model.parameters()).device
    prefix = fit_prefix(model, prefix, continuations)
    n, width = len(continuations), max(len(c) for c in continuations)
    ids = torch.zeros(n, width, dtype=torch.long)  # (n, W), right-padded
    mask = torch.zeros(n, len(prefix) + width, dtype=torch.long)  # (n, P+W)
    mask[:, : len(prefix)] = 1
    for row, cont in enumerate(continuations):
        ids[row, : len(cont)] = torch.tensor(cont)
        mask[row, len(prefix) : len(prefix) + len(cont)] = 1
    with torch.inference_mode():
        first = model(torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1)
        cache = output_cache(first)
        tile_cache(cache, n)
        logits = model(ids.to(device), attention_mask=mask.to(device), **with_cache(model, cache), use_cache=True).logits
        # position t of the continuation is predicted by the prefix's last logits (t = 0) or by position t - 1
        predict = torch.cat([first.logits[:, -1:].expand(n, 1, -1), logits[:, :-1]], dim=1).float()  # (n, W, V)
        out = []
        for row, cont in enumerate(continuations):
            lp = F.log_softmax(predict[row, : len(cont)], dim=-1)  # (m, V)
            out.append(lp.gather(-1, ids[row, : len(cont), None].to(device)).sum().item())
    return out


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special, return_attention_mask=False)["input_ids"]


def unconditional_prefix(tokenizer) -> list[int]:
    """The prefix for log p(c): the token that starts a document (BOS if the tokenizer adds one, else EOS)."""
    with_special = _encode(tokenizer, "a", True)
    if tokenizer.bos_token_id is not None and with_special and with_special[0] == tokenizer.bos_token_id:
        return [tokenizer.bos_token_id]
    if tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id]
    raise AttnshareError("The tokenizer has neither a BOS nor an EOS token; the next-sentence proxy needs one of them.")


def score_next_sentence(model, tokenizer, items: Sequence[ChoiceItem], batch_size: int = 4,
                        progress: bool = True) -> dict:
    """Accuracy of picking the true next sentence by PMI. An item's context runs once and its four candidates
    share one forward over the tiled context cache; the candidates' priors run ``batch_size`` items at a time."""
    empty = unconditional_prefix(tokenizer)
    choices = sorted({c for item in items for c in item.choices})
    cond = [shared_prefix_scores(model, _encode(tokenizer, item.context, True),
                                 [_encode(tokenizer, " " + c, False) for c in item.choices])
            for item in progress_bar(items, desc="next_sentence p(c|ctx)", unit="item", show=progress, leave=False)]
    unconditional = [(empty, _encode(tokenizer, " " + c, False)) for c in choices]  # each distinct candidate once
    prior = dict(zip(choices, (s for s, _ in continuation_scores(model, unconditional, batch_size * NUM_CHOICES,
                                                                    progress, "next_sentence p(c)"))))
    correct = 0
    for n, item in enumerate(items):
        pmi = [cond[n][j] - prior[c] for j, c in enumerate(item.choices)]
        correct += int(max(range(NUM_CHOICES), key=pmi.__getitem__) == item.label)
    return {"accuracy": correct / len(items), "correct": correct, "items": len(items), "chance": 1 / NUM_CHOICES}


def score_final_word(model, tokenizer, items: Sequence[WordItem], batch_size: int = 4, progress: bool = True) -> dict:
    """Accuracy of greedily predicting every token of the final word, and its mean log-likelihood."""
    requests = [(_encode(tokenizer, it.context, True), _encode(tokenizer, " " + it.target, False)) for it in items]
    scores = continuation_scores(model, requests, batch_size * NUM_CHOICES, progress, "final_word")
    correct = sum(greedy for _, greedy in scores)
    return {"accuracy": correct / len(items), "correct": correct, "items": len(items),
            "mean_logprob": sum(s for s, _ in scores) / len(items)}


# ---- registry ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProxyTask:
    name: str
    make_items: Callable[..., list]  # (text, num_items, seed, text_name) -> items
    score: Callable[..., dict]  # (model, tokenizer, items, batch_size, progress) -> {"accuracy": ...}
    description: str


PROXIES: dict[str, ProxyTask] = {
    "next_sentence": ProxyTask("next_sentence", next_sentence_items, score_next_sentence,
                               "4-way next sentence by PMI (chance 25%)"),
    "final_word": ProxyTask("final_word", final_word_items, score_final_word,
                            "LAMBADA-style greedy final word"),
}


def get_proxy(name: str) -> ProxyTask:
    if name not in PROXIES:
        raise AttnshareError(f"Unknown proxy task '{name}': use one of {', '.join(PROXIES)}.")
    return PROXIES[name]


def make_proxy_items(names: Sequence[str], text: str, num_items: int, seed: int = 0,
                     text_name: str = "text") -> dict[str, list]:
    """The items of each named proxy, built from the text alone (identical for every model)."""
    return {name: get_proxy(name).make_items(text, num_items, seed, text_name) for name in names}


def score_proxies(model, tokenizer, items: dict[str, list], batch_size: int = 4, progress: bool = True,
                  seed: int = 0) -> dict[str, dict]:
    """Score prepared items of each proxy; results carry the item count and the seed that built them."""
    model_was_training = model.training
    model.eval()
    try:
        return {name: {**get_proxy(name).score(model, tokenizer, task_items, batch_size, progress), "seed": seed}
                for name, task_items in items.items()}
    finally:
        model.train(model_was_training)
