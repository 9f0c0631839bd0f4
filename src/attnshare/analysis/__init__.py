"""Attention analysis (layer/head similarity, sensitivity, heatmaps) and the planners built on it.

- :func:`analyze` / :class:`AnalyzeConfig`: one run of every measure; ``Analysis.save(dir)`` writes JSON,
  safetensors and heatmaps.
- :mod:`.planning`: :func:`head_maps_for`, :func:`choose_lisa_layers`, :func:`plan_sa`.
- :mod:`.metrics`: the pure similarity functions; :mod:`.stats`: streaming accumulators.
- :mod:`.weights`: data-free weight similarity (DirectShare's matching).
"""

from .analyze import Analysis, AnalyzeConfig, analyze
from .planning import choose_lisa_layers, head_maps_for, plan_sa

__all__ = ["Analysis", "AnalyzeConfig", "analyze", "choose_lisa_layers", "head_maps_for", "plan_sa"]
