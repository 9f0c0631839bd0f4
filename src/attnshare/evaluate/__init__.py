"""Evaluation: token-level perplexity, offline zero-shot proxies, and an lm-eval adapter."""
