"""`attnshare demo`: analyze -> plan -> apply/train -> evaluate -> bench on one model, written as a report.

The pipeline is a list of named steps; each step adds variants (table rows), sections and images to a shared
:class:`Report`, and the report is rewritten after every step, so an interrupted demo still leaves a valid report.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import AttnshareError
from ..evaluate.perplexity import PerplexityConfig
from .variants import Baseline, VariantRow, baseline, measure_plans

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """What the demo runs (defaults fit in about 10 minutes on 2 CPU cores once the assets are cached)."""

    model: str = field(default="smollm2-135m", metadata={"help": "embedded name, folder or cached HF id"})
    out: str = field(default="report", metadata={"help": "report folder"})
    text: str = field(default="britannica", metadata={"help": "evaluation text (perplexity)"})
    ppl_tokens: int = field(default=4096, metadata={"help": "perplexity tokens per variant (1024-token windows)"})
    window: int = field(default=1024, metadata={"help": "perplexity window"})
    sa_budgets: list[int] = field(default_factory=lambda: [2, 4, 8], metadata={"help": "SA receiver counts to plan"})
    quick: bool = field(default=False, metadata={"help": "smallest settings (smoke test)"})

    def __post_init__(self) -> None:
        if self.ppl_tokens < self.window or self.window < 2:
            raise AttnshareError("--ppl-tokens must be at least one --window, and --window at least 2 tokens.")
        if any(b < 1 for b in self.sa_budgets):
            raise AttnshareError("--sa-budgets must be positive numbers of receiver layers.")

    def ppl_config(self) -> PerplexityConfig:
        return PerplexityConfig(text=self.text, window=self.window, max_tokens=self.ppl_tokens, batch_size=4)


@dataclass
class Report:
    config: DemoConfig
    base: Baseline | None = None
    variants: list[VariantRow] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # paths relative to the report folder
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    def measure(self, model, tokenizer, plans, name: str, method: str, notes: str = "") -> VariantRow:
        row = measure_plans(model, tokenizer, plans, self.config.ppl_config(), self.base, name=name, method=method,
                            notes=notes, progress=False)
        self.variants.append(row)
        return row


Step = Callable[[Report, torch.nn.Module, object], None]


def step_base(report: Report, model, tokenizer) -> None:
    report.base = baseline(model, tokenizer, report.config.ppl_config(), progress=False)


def step_sa(report: Report, model, tokenizer) -> None:
    from ..methods.sa import SA, SAConfig, SAPlan

    for budget in report.config.sa_budgets:
        if budget >= model.config.num_hidden_layers:
            continue
        plan = SA().make_plan(model, SAConfig(budget=budget, align_heads=True))
        report.measure(model, tokenizer, plan, f"sa {budget} receivers", "sa", "planner, aligned heads")
    if model.config.num_hidden_layers == 30:  # the paper's style of fixed late span, for comparison
        span = SAPlan(donors={23: 22, 24: 22, 25: 22, 26: 22})
        report.measure(model, tokenizer, span, "sa span 23-26<-22", "sa", "paper-style fixed span")


def step_plots(report: Report, model, tokenizer) -> None:
    from .plots import Point, pareto_plot

    kv = [Point(r.method, r.name.removeprefix(r.method).strip(), r.kv_saved, r.ppl_ratio)
          for r in report.variants if r.kv_saved > 0]
    params = [Point(r.method, r.name.removeprefix(r.method).strip(), r.params_saved, r.ppl_ratio)
              for r in report.variants if r.params_saved > 0]
    if kv:
        pareto_plot(kv, report.out / "pareto_kv.png", xlabel="KV cache saved (%)",
                    title="Quality vs KV-cache saving")
        report.images.append("pareto_kv.png")
    if params:
        pareto_plot(params, report.out / "pareto_params.png", xlabel="parameters saved (%)",
                    title="Quality vs parameter saving")
        report.images.append("pareto_params.png")


STEPS: list[tuple[str, Step]] = [
    ("base", step_base),
    ("sa", step_sa),
    ("plots", step_plots),
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
    out, base, cfg = report.out, report.base, report.config
    rows = [v.to_dict() for v in report.variants]
    payload = {"config": asdict(cfg), "base": asdict(base) if base else None, "variants": rows,
               "timings_s": report.timings}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"# attnshare demo report: `{cfg.model}`", ""]
    if base:
        lines += [
            f"Base model: perplexity **{base.ppl:.2f}** ({cfg.text}, first {cfg.ppl_tokens} tokens, {cfg.window}-token "
            f"windows), {base.params:,} parameters, {base.kv_per_token:,.0f} KV-cache bytes per token.", "",
        ]
    lines += [
        "| variant | plan | ppl | × base | params saved | KV cache saved | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r.name} | {r.plan} | {r.ppl:.2f} | {r.ppl_ratio:.3f} | {100 * r.params_saved:.1f}% | "
              f"{100 * r.kv_saved:.1f}% | {r.notes} |" for r in report.variants]
    lines += ["", *report.sections, "", *(f"![{Path(i).stem}]({i})" for i in report.images), "",
              "Step timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report.timings.items()), ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
