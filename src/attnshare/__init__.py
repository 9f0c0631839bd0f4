"""attnshare: share attention across layers and heads of pretrained Hugging Face language models.

Public API (imported lazily, so ``import attnshare`` is cheap and has no side effects)::

    model, tok = attnshare.load_model("smollm2-135m")
    result = attnshare.perplexity(model, tok)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_model": "attnshare.models",
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
    "load_plans": "attnshare.plan",
    "save_plans": "attnshare.plan",
    "get_method": "attnshare.methods",
    "train": "attnshare.api",
    "train_shared": "attnshare.training",
    "TrainConfig": "attnshare.training",
    "AttnshareError": "attnshare.errors",
    "load_text": "attnshare.data",
    "analyze": "attnshare.analysis",
    "AnalyzeConfig": "attnshare.analysis",
    "run_bench": "attnshare.bench",
}

__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'attnshare' has no attribute {name!r}")
