"""`attnshare demo`: analyze -> plan -> apply/train -> evaluate -> bench on one model, written as a report.

The pipeline is a list of steps; each step adds rows (one per variant) and files to a shared :class:`Report`.
Steps whose method is not installed are skipped with a note, so the demo always runs end to end.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..evaluate.perplexity import PerplexityConfig, perplexity

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """What the demo runs (defaults fit in about 10 minutes on 2 CPU cores)."""

    model: str = field(default="smollm2-135m", metadata={"help": "embedded name, folder or cached HF id"})
    out: str = field(default="report", metadata={"help": "report folder"})
    ppl_tokens: int = field(default=4096, metadata={"help": "perplexity tokens per variant (Britannica, 1024-token windows)"})
    sa_budgets: list[int] = field(default_factory=lambda: [2, 4, 8], metadata={"help": "SA receiver counts to plan"})
    quick: bool = field(default=False, metadata={"help": "smallest settings (smoke test)"})


@dataclass
class Variant:
    """One row of the report: a method/budget and what it costs and saves."""

    name: str
    method: str
    ppl: float
    params: int
    kv_fraction: float  # KV-cache bytes relative to the base model
    notes: str = ""


@dataclass
class Report:
    config: DemoConfig
    base_ppl: float = 0.0
    base_params: int = 0
    variants: list[Variant] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return Path(self.config.out)


Step = Callable[[Report, torch.nn.Module, object], None]


def _ppl_config(report: Report) -> PerplexityConfig:
    return PerplexityConfig(text="britannica", window=1024, max_tokens=report.config.ppl_tokens, batch_size=4)


def measure_variant(report: Report, base, tokenizer, plans, name: str, method: str, notes: str = "") -> Variant:
    """Apply ``plans`` to a copy of the base model and record its perplexity, parameters and KV fraction."""
    import attnshare
    from ..bench.memory import cache_bytes

    model = attnshare.apply(copy.deepcopy(base), plans) if plans else base
    ppl = perplexity(model, tokenizer, _ppl_config(report), progress=False).ppl
    ids = torch.zeros(1, 16, dtype=torch.long)
    with torch.no_grad():
        kv = cache_bytes(model(ids, use_cache=True).past_key_values)
        base_kv = cache_bytes(base(ids, use_cache=True).past_key_values)
    variant = Variant(name, method, ppl, model.num_parameters(), kv / base_kv, notes)
    report.variants.append(variant)
    return variant


def step_base(report: Report, model, tokenizer) -> None:
    report.base_params = model.num_parameters()
    report.base_ppl = measure_variant(report, model, tokenizer, [], "base", "base").ppl


def step_sa(report: Report, model, tokenizer) -> None:
    from ..methods.sa import SAPlan

    span = SAPlan(donors={23: 22, 24: 22, 25: 22, 26: 22})
    if model.config.num_hidden_layers == 30:
        measure_variant(report, model, tokenizer, span, "sa paper span 23-26<-22", "sa", "paper-style fixed span")


STEPS: list[tuple[str, Step]] = [
    ("base", step_base),
    ("sa", step_sa),
]


def run_demo(config: DemoConfig) -> Report:
    from ..models import load_model

    report = Report(config)
    report.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(config.model)
    for name, step in tqdm(STEPS, desc="demo", unit="step"):
        start = time.perf_counter()
        step(report, model, tokenizer)
        report.timings[name] = time.perf_counter() - start
        write_report(report)  # a partial report survives an interrupted demo
    return report


def write_report(report: Report) -> Path:
    out = report.out
    rows = [asdict(v) | {"ppl ratio": v.ppl / report.base_ppl if report.base_ppl else float("nan"),
                         "params saved": report.base_params - v.params} for v in report.variants]
    (out / "results.json").write_text(json.dumps({"config": asdict(report.config), "variants": rows,
                                                  "timings_s": report.timings}, indent=2) + "\n")
    lines = [
        f"# attnshare demo report: `{report.config.model}`",
        "",
        f"Perplexity: Britannica, first {report.config.ppl_tokens} tokens, 1024-token windows (reduced protocol; "
        "docs/RESULTS.md has the full 16,384-token protocol).",
        "",
        "| variant | method | ppl | ppl ratio | parameters | params saved | KV cache vs base | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['method']} | {r['ppl']:.2f} | {r['ppl ratio']:.3f} | {r['params']:,} | "
                     f"{r['params saved']:,} | {r['kv_fraction']:.3f} | {r['notes']} |")
    lines += ["", *report.sections, "", *(f"![{Path(i).stem}]({i})" for i in report.images), "",
              "Step timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report.timings.items()), ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
