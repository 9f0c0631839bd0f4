"""`attnshare demo`: analyze -> plan -> apply/train -> evaluate -> bench on one model, written as a report.

The pipeline is a list of named steps; each step adds variants (table rows), sections and images to a shared
:class:`Report`, and the report is rewritten after every step, so an interrupted demo still leaves a valid report.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..analysis.analyze import AnalyzeConfig, analyze
from ..analysis.report import save_analysis
from ..api import load, load_model, save, train
from ..bench.harness import BenchConfig, artifact_variant, base_variant, get_scenario, plan_variant, run_bench
from ..data import load_text
from ..errors import AttnshareError
from ..evaluate.perplexity import PerplexityConfig
from ..evaluate.proxies import make_proxy_items
from ..models.loading import model_identity
from ..paths import cache_dir
from ..progress import progress_bar
from ..sharing.registry import get_method, plans_from_json
from ..training import TrainConfig
from ..version import __version__
from .compare import CompareConfig, compare, markdown
from .plots import Point, pareto_plot
from .variants import Baseline, VariantRow, baseline, measure, measure_plans

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """What the demo runs (defaults: 9.2 minutes on a 2-core 2.0 GHz Zen 1 box with the assets cached;
    docs/RESULTS.md, "Demo")."""

    model: str = field(default="smollm2-135m", metadata={"help": "embedded name, folder or cached HF id"})
    out: str = field(default="report", metadata={"help": "report folder"})
    text: str = field(default="britannica", metadata={"help": "evaluation text (perplexity)"})
    ppl_tokens: int = field(
        default=2048, metadata={"help": "perplexity tokens per variant and text (1024-token windows; RESULTS use 16k)"}
    )
    window: int = field(default=1024, metadata={"help": "perplexity window"})
    proxy_items: int = field(
        default=0, metadata={"help": "next-sentence proxy items per variant (0 skips; each item costs about as much as "
                                     "200 perplexity tokens, and 200 items are needed for a ±7-point interval)"})
    calib_tokens: int = field(default=1024, metadata={"help": "calibration tokens (plays) for analysis and planners"})
    heldout_tokens: int = field(default=256, metadata={"help": "held-out calibration tokens on which planners measure KL"})
    greedy_width: int = field(default=4, metadata={"help": "planners' lazy greedy: options measured per step (0: all)"})
    kv_savings: list[float] = field(
        default_factory=lambda: [1 / 15],
        metadata={"help": "KV savings at which SA and the drop/layerdrop baselines are compared (1/15 on 30 layers: 4 "
                          "SA receivers or 2 dropped layers)"},
    )
    compare_methods: list[str] = field(
        default_factory=lambda: ["sa", "drop", "layerdrop"],
        metadata={"help": "methods of the equal-savings step (add mix for the mixed planner; it costs minutes)"},
    )
    second_text: str = field(default="pyref", metadata={"help": "second held-out text of the equal-savings table"})
    same_layers: bool = field(
        default=False, metadata={"help": "equal-savings step: also drop the attention of SA's receiver layers (the "
                                         "papers' comparison, not at equal savings; `attnshare compare` does it)"})
    lisa_fraction: float = field(default=0.53, metadata={"help": "fraction of layers that become LiSA layers"})
    lisa_minutes: float = field(
        default=1.0, metadata={"help": "LiSA training budget; the trained artifact is cached and reused by later runs"}
    )
    ds_ratios: list[float] = field(default_factory=lambda: [0.1], metadata={"help": "DirectShare ratios"})
    ds_loss_tokens: int = field(default=64, metadata={"help": "DirectShare: held-out tokens its unit choice is measured on"})
    bench_context: int = field(default=512, metadata={"help": "short benchmark: prompt tokens (batch 1)"})
    bench_long_batch: int = field(default=4, metadata={"help": "long benchmark: sequences (0 skips it)"})
    bench_long_context: int = field(default=1024, metadata={"help": "long benchmark: prompt tokens per sequence"})
    bench_prefill_batch: int = field(
        default=1, metadata={"help": "long benchmark: sequences actually prefilled, their cache tiled over the batch "
                                     "for decode (0: the whole batch)"})
    bench_new_tokens: int = field(default=16, metadata={"help": "benchmark decode steps"})
    bench_repeats: int = field(default=1, metadata={"help": "benchmark repeats after one warm-up (medians)"})

    def __post_init__(self) -> None:
        if self.ppl_tokens < self.window or self.window < 2:
            raise AttnshareError("--ppl-tokens must be at least one --window, and --window at least 2 tokens.")
        if not all(0 < f < 1 for f in self.kv_savings):
            raise AttnshareError("--kv-savings must be fractions in (0, 1).")
        if not 0 < self.lisa_fraction < 1 or not all(0 <= r < 1 for r in self.ds_ratios):
            raise AttnshareError("--lisa-fraction must lie in (0, 1) and --ds-ratios in [0, 1).")
        if self.proxy_items < 0 or self.lisa_minutes <= 0 or self.bench_repeats < 1 or self.bench_prefill_batch < 0:
            raise AttnshareError("--proxy-items and --bench-prefill-batch must be >= 0, --lisa-minutes > 0 and "
                                 "--bench-repeats >= 1.")
        if self.bench_long_batch and self.bench_prefill_batch and self.bench_long_batch % self.bench_prefill_batch:
            raise AttnshareError(f"--bench-prefill-batch {self.bench_prefill_batch} must divide --bench-long-batch "
                                 f"{self.bench_long_batch} (the prefilled cache is tiled over the batch).")
        if self.ds_loss_tokens < 2 or self.greedy_width < 0:
            raise AttnshareError("--ds-loss-tokens must be at least 2 and --greedy-width zero or more.")

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
    proxy_items: dict[str, list] | None = None
    bench_variants: list = field(default_factory=list)  # (name, build) pairs for the benchmark step
    compare: list = field(default_factory=list)  # (base, rows, config) of each equal-savings comparison

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    def measure(self, model, tokenizer, plans, name: str, method: str, notes: str = "") -> VariantRow:
        row = measure_plans(model, tokenizer, plans, self.config.ppl_config(), self.base, name=name, method=method,
                            notes=notes, progress=False, proxy_items=self.proxy_items)
        self.variants.append(row)
        return row

    def section(self, title: str, *lines: str) -> None:
        self.sections += [f"## {title}", "", *lines, ""]


Step = Callable[[Report, torch.nn.Module, object], None]


def step_base(report: Report, model, tokenizer) -> None:
    cfg = report.config
    if cfg.proxy_items:
        report.proxy_items = make_proxy_items(["next_sentence"], load_text(cfg.text), cfg.proxy_items, 0, cfg.text)
    report.base = baseline(model, tokenizer, cfg.ppl_config(), progress=False, proxy_items=report.proxy_items)


def step_analyze(report: Report, model, tokenizer) -> None:
    cfg = report.config
    config = AnalyzeConfig(tokens=cfg.calib_tokens, seq_len=min(512, cfg.calib_tokens), sensitivity_every=3,
                           heldout_tokens=cfg.heldout_tokens)
    analysis = analyze(model, config, tokenizer=tokenizer, progress=False)
    paths = save_analysis(analysis, report.out / "analysis")
    report.images += [str(p.relative_to(report.out)) for p in paths if p.suffix == ".png"]
    report.section(
        "Analysis",
        f"Attention statistics over {cfg.calib_tokens} calibration tokens of `plays` (sensitivity on every 3rd layer, "
        f"{cfg.heldout_tokens} held-out tokens); raw numbers in `analysis/analysis.json` and `analysis.safetensors`.",
    )


def _planner_settings(cfg: DemoConfig) -> dict:
    return {"calib_tokens": cfg.calib_tokens, "calib_seq_len": min(512, cfg.calib_tokens),
            "heldout_tokens": cfg.heldout_tokens, "greedy_width": cfg.greedy_width}


def step_equal_savings(report: Report, model, tokenizer) -> None:
    """Each method's own plan at the same KV saving, beside the removal baselines, on two held-out texts."""
    cfg = report.config
    config = CompareConfig(kv_saving=list(cfg.kv_savings), param_saving=[], methods=list(cfg.compare_methods),
                           texts=[cfg.text, cfg.second_text], max_tokens=cfg.ppl_tokens, window=cfg.window,
                           same_layers=cfg.same_layers,
                           **_planner_settings(cfg))
    known = {cfg.text: report.base.ppl} if report.base else None  # the base step measured the main text already
    base, rows = compare(model, tokenizer, config, progress=False, base_ppl=known)
    report.compare.append((base, rows, config))
    for row in rows:
        if row.kind != "kv":
            continue
        name = f"{row.method} at {100 * row.target:.1f}% KV"
        notes = "removal baseline, untrained" if row.baseline else "own planner, untrained"
        report.variants.append(VariantRow(
            name=name, method=row.method, plan=row.plan, ppl=row.ppl[cfg.text], ppl_ratio=row.ratio[cfg.text],
            params=row.params, params_saved=row.params_saved, kv_per_token=row.kv_per_token, kv_saved=row.kv_saved,
            notes=notes + (" (no proxy: the equal-savings step scores perplexity only)" if cfg.proxy_items else "")))
        report.bench_variants.append((name, plans_from_json(row.plans)))
    report.section("Equal savings (untrained plans, two held-out texts)", markdown(base, rows, config))


def step_lisa(report: Report, model, tokenizer) -> None:
    cfg, lisa = report.config, get_method("lisa")
    config = lisa.config_cls(fraction=cfg.lisa_fraction, **_lisa_settings(lisa, cfg))
    budget = TrainConfig(max_minutes=cfg.lisa_minutes, max_steps=100_000, progress=False)
    # the cache key names the recipe (every planning and training setting), so a changed default retrains
    recipe = json.dumps([asdict(config), asdict(budget)], sort_keys=True, default=str)
    key = f"{model_identity(model)['fingerprint']}-v{__version__}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    cached = cache_dir() / "demo" / f"lisa-{key}"
    shared = _load_cached(cached, model)
    if shared is not None:
        notes = f"trained {cfg.lisa_minutes:g} min (cached artifact)"
    else:
        plan = lisa.make_plan(model, config)
        shared = copy.deepcopy(model)
        result = train(shared, tokenizer, plan, budget)
        save(shared, cached)
        local = int(result.metrics.get("local_steps", 0))
        notes = (f"trained {cfg.lisa_minutes:g} min: {local} layer-local steps, then {result.steps} end-to-end steps "
                 f"({result.seconds / 60:.1f} min); far from converged (RESULTS: 15 min)")
    row = measure(shared, tokenizer, cfg.ppl_config(), report.base, name=f"lisa {cfg.lisa_fraction:g}",
                  method="lisa", notes=notes, progress=False, proxy_items=report.proxy_items)
    report.variants.append(row)
    report.bench_variants.append((f"lisa {cfg.lisa_fraction:g}", cached))
    del shared


def _load_cached(path: Path, model):
    """The cached trained artifact on a copy of `model`, or None when absent or written by an incompatible version."""

    if not (path / "attnshare.json").is_file():
        return None
    try:
        shared, _ = load(path, model=copy.deepcopy(model))
    except Exception as err:  # noqa: BLE001 -- a stale cache must never stop the demo: retrain instead
        log.warning("cached LiSA artifact %s cannot be loaded (%s); training again", path, err)
        return None
    return shared


def _lisa_settings(lisa, cfg: DemoConfig) -> dict:
    """The demo's calibration settings, for whichever of them the LiSA config has."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(lisa.config_cls)}
    return {k: v for k, v in _planner_settings(cfg).items() if k in names}


def step_directshare(report: Report, model, tokenizer) -> None:
    ds = get_method("directshare")
    ratios = report.config.ds_ratios
    configs = [ds.config_cls(ratio=ratio, loss_tokens=report.config.ds_loss_tokens) for ratio in ratios]
    plans = ds.make_plans(model, configs)  # one measurement for all ratios
    for ratio, plan in zip(ratios, plans):
        report.measure(model, tokenizer, plan, f"directshare {ratio:g}", "directshare",
                       f"units by {plan.select or plan.match}, no training")
        report.bench_variants.append((f"directshare {ratio:g}", [plan]))


def step_bench(report: Report, model, tokenizer) -> None:
    cfg = report.config
    variants = [base_variant(model)]
    picked = {}  # one variant per method: the largest budget measured
    for name, what in report.bench_variants:
        picked[name.split()[0]] = (name, what)
    for name, what in picked.values():
        variants.append(artifact_variant(model, what, name) if isinstance(what, Path) else plan_variant(model, what, name))
    scenarios = [(get_scenario("short", context=cfg.bench_context, new_tokens=cfg.bench_new_tokens), 0)]
    if cfg.bench_long_batch:  # where KV reads rival weight reads, so cache savings can show in decode speed
        scenarios.append((get_scenario("long", batch=cfg.bench_long_batch, context=cfg.bench_long_context,
                                       new_tokens=cfg.bench_new_tokens), cfg.bench_prefill_batch))
    results = {}
    for scenario, prefill_batch in scenarios:
        config = BenchConfig(repeats=cfg.bench_repeats, warmup=1, progress=False, prefill_batch=prefill_batch)
        result = run_bench(variants, scenario, config, command="attnshare demo")
        results[scenario.name] = result.to_dict()
        report.section(f"Speed and memory: {scenario.name} (batch {scenario.batch}, {scenario.context}-token "
                       f"prompt, {scenario.new_tokens} new tokens; same process, interleaved)", result.to_markdown())
    (report.out / "bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


def step_plots(report: Report, model, tokenizer) -> None:
    def points(saving: str) -> list[Point]:
        return [Point(r.method, r.name.removeprefix(r.method).strip(), getattr(r, saving), r.ppl_ratio)
                for r in report.variants if getattr(r, saving) > 0]

    for saving, label in (("kv_saved", "KV cache"), ("params_saved", "parameters")):
        if pts := points(saving):
            path = pareto_plot(pts, report.out / f"pareto_{saving}.png", xlabel=f"{label} saved (%)",
                               title=f"Quality vs {label} saving ({report.config.model})")
            report.images.insert(0, path.name)


STEPS: list[tuple[str, Step]] = [
    ("base", step_base),
    ("analyze", step_analyze),
    ("equal savings", step_equal_savings),
    ("lisa", step_lisa),
    ("directshare", step_directshare),
    ("bench", step_bench),
    ("plots", step_plots),
]


def run_demo(config: DemoConfig) -> Report:
    report = Report(config)
    report.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(config.model)
    for name, step in progress_bar(STEPS, desc="demo", unit="step"):
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
    proxy = cfg.proxy_items > 0
    if base:
        lines += [
            (f"Base model: perplexity **{base.ppl:.2f}** ({cfg.text}, first {cfg.ppl_tokens} tokens, {cfg.window}-token "
             f"windows; docs/RESULTS.md uses the full 16,384-token protocol), {base.params:,} parameters, "
             f"{base.kv_per_token:,.0f} KV-cache bytes per token. " + (
                 f"Next-sentence accuracy: {cfg.proxy_items} items drawn from the same text (chance 25%; the 95% "
                 f"interval is about ±{_interval(cfg.proxy_items)} points)." if proxy else
                 "Next-sentence accuracy is off (`--proxy-items N`): a 95% interval of ±7 points takes about 200 "
                 "items, about 6 minutes per model on 2 CPU cores.")),
            "",
        ]
    head = ["variant", "plan", "ppl", "× base", *(["next-sentence acc"] if proxy else []), "params saved",
            "KV cache saved", "notes"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(name: str, plan: str, ppl: float, ratio: float, proxies: dict, params: float, kv: float, notes: str):
        cells = [name, plan, f"{ppl:.2f}", f"{ratio:.3f}", *([_acc(proxies)] if proxy else []), f"{100 * params:.1f}%",
                 f"{100 * kv:.1f}%", notes]
        return "| " + " | ".join(cells) + " |"

    if base:
        lines.append(line("base", "—", base.ppl, 1.0, base.proxies, 0.0, 0.0, ""))
    lines += [line(r.name, r.plan, r.ppl, r.ppl_ratio, r.proxies, r.params_saved, r.kv_saved, r.notes)
              for r in report.variants]
    lines += ["", *report.sections, "", *(f"![{Path(i).stem}]({i})" for i in report.images), "",
              "Step timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report.timings.items()), ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def _interval(items: int) -> int:
    """Half-width, in points, of a 95% interval for an accuracy near 50% measured on `items` items."""
    return round(100 * 1.96 * (0.25 / max(items, 1)) ** 0.5)


def _acc(proxies: dict[str, float]) -> str:
    return f"{100 * proxies['next_sentence']:.1f}%" if "next_sentence" in proxies else "—"
