"""Benchmarks: speed and memory of base and shared variants side by side, next to the byte model's ideal.

- ``bytemodel``: pure functions for the ideal cost of decode (bytes read) and prefill (FLOPs).
- ``memory``: exact bytes from tensors (KV cache, parameters) and peak-memory tracking.
- ``harness``: scenarios, variants, :func:`run_bench` and its :class:`BenchResult` (markdown + JSON).
"""

from ..memory import cache_bytes, parameter_bytes
from .bytemodel import (
    ModelCosts,
    decode_bytes,
    decode_bytes_per_step,
    ideal_ratio,
    max_batch_under_budget,
    model_costs,
    prefill_flops,
)
from .harness import (
    SCENARIOS,
    BenchConfig,
    BenchResult,
    Scenario,
    Variant,
    artifact_variant,
    base_variant,
    get_scenario,
    plan_variant,
    run_bench,
)

__all__ = [
    "SCENARIOS", "BenchConfig", "BenchResult", "ModelCosts", "Scenario", "Variant", "artifact_variant", "base_variant",
    "cache_bytes", "decode_bytes", "decode_bytes_per_step", "get_scenario", "ideal_ratio", "max_batch_under_budget",
    "model_costs", "parameter_bytes", "plan_variant", "prefill_flops", "run_bench",
]
