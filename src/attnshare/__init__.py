"""attnshare: share attention across layers and heads of pretrained Hugging Face language models.

Public API (imported lazily, so ``import attnshare`` is cheap and has no side effects)::

    model, tok = attnshare.load_model("smollm2-135m")
    result = attnshare.perplexity(model, tok)
"""

from __future__ import annotations

import importlib

from .version import __version__  # noqa: F401 (re-exported)

_API = {
    "load_model": "attnshare.api",
    "model_identity": "attnshare.models",
    "perplexity": "attnshare.evaluate.perplexity",
    "PerplexityConfig": "attnshare.evaluate.perplexity",
    "evaluate": "attnshare.evaluate.suite",
    "EvalConfig": "attnshare.evaluate.suite",
    "apply": "attnshare.api",
    "unapply": "attnshare.api",
    "save": "attnshare.api",
    "load": "attnshare.api",
    "applied_plans": "attnshare.api",
    "load_plans": "attnshare.sharing.registry",
    "save_plans": "attnshare.plan",
    "get_method": "attnshare.sharing.registry",
    "train": "attnshare.api",
    "train_shared": "attnshare.training",
    "TrainConfig": "attnshare.training",
    "AttnshareError": "attnshare.errors",
    "load_text": "attnshare.data",
    "analyze": "attnshare.analysis.analyze",
    "AnalyzeConfig": "attnshare.analysis.analyze",
    "run_bench": "attnshare.bench.harness",
}

__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'attnshare' has no attribute {name!r}")
