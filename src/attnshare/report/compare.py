"""Equal-savings comparison: every method, and the removal baselines, at the same KV-cache and parameter savings.

For each savings target each method makes its own best plan (``SharingMethod.config_for_saving``; one selection
per method and kind, since a method's plans for larger savings reuse the work of smaller ones), and every plan is
measured the same way: perplexity on each held-out text (never read by planning), exact KV bytes per token and
exact parameter count. Variants made elsewhere (trained artifacts, e.g. LiSA) join as extra rows at their measured
savings. A "same layers" table sets SA's receivers beside dropping the attention of those very layers, as the
papers compare; it is labelled as such, because at equal savings drop picks its own layers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from ..api import applied_plans, apply, load
from ..errors import AttnshareError
from ..evaluate.perplexity import PerplexityConfig, perplexity
from ..methods.drop import DropPlan
from ..methods.sa import SAPlan
from ..paths import write_folder
from ..plan import Plan
from ..progress import progress_bar
from ..sharing.registry import get_method
from .plots import Point, pareto_plot
from .variants import kv_bytes_per_token

log = logging.getLogger(__name__)

KINDS = {"kv": "KV cache", "params": "parameters"}


@dataclass
class CompareConfig:
    """What ``attnshare compare`` measures: methods x savings targets x held-out texts."""

    kv_saving: list[float] = field(default_factory=lambda: [0.0667, 0.1333, 0.2, 0.3333],
                                   metadata={"help": "KV-cache savings targets (fractions)"})
    param_saving: list[float] = field(default_factory=lambda: [0.0667, 0.1333, 0.2, 0.3333],
                                      metadata={"help": "parameter savings targets (fractions; empty with --param-saving 0)"})
    methods: list[str] = field(default_factory=lambda: ["sa", "mix", "directshare", "drop", "layerdrop"],
                               metadata={"help": "methods planned at each target (baselines drop and layerdrop included)"})
    texts: list[str] = field(default_factory=lambda: ["britannica", "pyref"],
                             metadata={"help": "held-out texts for perplexity (never used by the planners)"})
    max_tokens: int = field(default=16384, metadata={"help": "perplexity tokens per text"})
    window: int = field(default=1024, metadata={"help": "perplexity window"})
    artifacts: list[str] = field(default_factory=list,
                                 metadata={"help": "attnshare artifacts (e.g. trained LiSA) added as rows at their savings"})
    same_layers: bool = field(default=True, metadata={"help": "also compare SA with dropping the same layers"})
    calib_tokens: int = field(default=1024, metadata={"help": "planners: calibration tokens (plays)"})
    calib_seq_len: int = field(default=512, metadata={"help": "planners: calibration sequence length"})
    heldout_tokens: int = field(default=512, metadata={"help": "planners: held-out calibration tokens for KL"})
    greedy_width: int = field(default=6, metadata={"help": "planners: options each greedy step measures (0: all)"})

    def __post_init__(self) -> None:
        targets = [f for f in self.kv_saving + self.param_saving if f]
        if not targets or not all(0 < f < 1 for f in targets):
            raise AttnshareError("--kv-saving and --param-saving take fractions in (0, 1); give at least one.")
        if not self.methods or not self.texts:
            raise AttnshareError("Give at least one --methods name and one --texts name.")
        self.kv_saving = sorted(f for f in self.kv_saving if f)
        self.param_saving = sorted(f for f in self.param_saving if f)

    def planner_settings(self) -> dict[str, int]:
        return {"calib_tokens": self.calib_tokens, "calib_seq_len": self.calib_seq_len,
                "heldout_tokens": self.heldout_tokens, "greedy_width": self.greedy_width}

    def ppl_configs(self) -> list[PerplexityConfig]:
        return [PerplexityConfig(text=t, window=self.window, max_tokens=self.max_tokens) for t in self.texts]


@dataclass
class Row:
    """One measured variant: what it is, what it saves (measured), and its perplexity ratio on each text."""

    kind: str  # "kv", "params", "same layers" or "artifact"
    target: float  # the savings fraction asked for (0 for artifacts)
    method: str
    baseline: bool
    plan: str
    kv_saved: float
    params_saved: float
    ppl: dict[str, float]
    ratio: dict[str, float]
    params: int = 0
    kv_per_token: float = 0.0
    plans: list[dict] = field(default_factory=list)  # the plans as JSON objects (plans_from_json rebuilds them)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Base:
    ppl: dict[str, float]
    params: int
    kv_per_token: float


def measure_model(model: nn.Module, tokenizer, ppl_configs: list[PerplexityConfig]) -> dict[str, float]:
    return {c.text: perplexity(model, tokenizer, c, progress=False).ppl for c in ppl_configs}


def measure_row(model: nn.Module, tokenizer, ppl_configs, base: Base, *, kind: str, target: float, method: str,
                baseline: bool) -> Row:
    ppl, kv, params = measure_model(model, tokenizer, ppl_configs), kv_bytes_per_token(model), model.num_parameters()
    plans = applied_plans(model)
    return Row(kind=kind, target=target, method=method, baseline=baseline, plan="; ".join(p.summary() for p in plans),
               kv_saved=1 - kv / base.kv_per_token, params_saved=1 - params / base.params,
               ppl=ppl, ratio={t: ppl[t] / base.ppl[t] for t in ppl}, params=params, kv_per_token=kv,
               plans=[p.to_dict() for p in plans])


def measure_plan(base_model, tokenizer, plans: Plan | list[Plan], ppl_configs, base: Base, **kw) -> Row:
    shared = apply(copy.deepcopy(base_model), plans)
    try:
        return measure_row(shared, tokenizer, ppl_configs, base, **kw)
    finally:
        del shared


def planned(model: nn.Module, method_name: str, kind: str, targets: list[float],
            settings: dict[str, int]) -> list[tuple[float, Plan]]:
    """(target, plan) for each target the method can reach untrained; one selection for all of them. ``settings``
    (calibration sizes) apply to every config that has such a field."""
    method = get_method(method_name)
    configs = [(f, method.config_for_saving(model, kind, f)) for f in targets]
    configs = [(f, c if c is None else dataclasses.replace(
        c, **{k: v for k, v in settings.items() if k in {x.name for x in dataclasses.fields(c)}}))
        for f, c in configs]
    reachable = [(f, c) for f, c in configs if c is not None]
    if not reachable:
        return []
    plans = method.make_plans(model, [c for _, c in reachable])
    return [(f, p) for (f, _), p in zip(reachable, plans)]


def same_layer_plans(plans: dict[tuple[str, float], Plan]) -> list[tuple[float, Plan]]:
    """For every SA plan of the KV comparison, drop on exactly its receivers (the papers' comparison)."""
    out = []
    for (kind, target), plan in sorted(plans.items()):
        if kind == "kv" and isinstance(plan, SAPlan):
            out.append((target, DropPlan(layers=plan.receivers)))
    return out


def compare(model: nn.Module, tokenizer, config: CompareConfig, *, progress: bool = True,
            base_ppl: dict[str, float] | None = None) -> tuple[Base, list[Row]]:
    """Plan every method at every target and measure every plan (and artifact) on every text.

    ``base_ppl`` holds the base model's perplexities already measured under this protocol (text -> ppl, e.g. by the
    demo's first step); those texts are not measured again."""
    for name in config.methods:
        get_method(name)  # unknown names fail before any measurement
    ppl_configs = config.ppl_configs()
    known = {t: p for t, p in (base_ppl or {}).items() if t in config.texts}
    ppl = known | measure_model(model, tokenizer, [c for c in ppl_configs if c.text not in known])
    base = Base({t: ppl[t] for t in config.texts}, model.num_parameters(), kv_bytes_per_token(model))
    log.info("base ppl %s", base.ppl)
    work = []  # (kind, target, method name, plan)
    for kind, targets in (("kv", config.kv_saving), ("params", config.param_saving)):
        for name in progress_bar(config.methods if targets else [], desc=f"planning at equal {KINDS[kind]}",
                                 unit="method", show=progress):
            work += [(kind, f, name, plan) for f, plan in planned(model, name, kind, targets, config.planner_settings())]
    sa_plans = {(kind, f): plan for kind, f, name, plan in work if name == "sa"}
    if config.same_layers:
        work += [("same layers", f, "drop", plan) for f, plan in same_layer_plans(sa_plans)]
    rows = []
    for kind, target, name, plan in progress_bar(work, desc="measuring plans", unit="plan", show=progress):
        rows.append(measure_plan(model, tokenizer, plan, ppl_configs, base, kind=kind, target=target, method=name,
                                 baseline=get_method(name).baseline))
        if kind == "same layers":
            rows[-1].method = "drop (same layers as SA)"
    for path in config.artifacts:
        shared, _ = load(path)
        methods = "+".join(p.method for p in applied_plans(shared))
        rows.append(measure_row(shared, tokenizer, ppl_configs, base, kind="artifact", target=0.0,
                                method=f"{methods} ({Path(path).name})", baseline=False))
    return base, rows


# ---- tables and plots ------------------------------------------------------------------------------------------


def fmt_ratio(row: Row | None, text: str) -> str:
    return "n/a" if row is None else f"×{row.ratio[text]:.3f}"


def equal_savings_table(rows: list[Row], kind: str, texts: list[str]) -> list[str]:
    """Markdown: one line per (target, method), the measured saving beside the target, best per target in bold."""
    mine = [r for r in rows if r.kind == kind]
    if not mine:
        return []
    saved = "kv_saved" if kind == "kv" else "params_saved"
    head = ["target", "method", f"{KINDS[kind]} saved"] + [f"ppl ×base ({t})" for t in texts] + ["plan"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for target in sorted({r.target for r in mine}):
        at = sorted((r for r in mine if r.target == target), key=lambda r: r.ratio[texts[0]])
        for i, r in enumerate(at):
            name = f"**{r.method}**" if i == 0 else r.method
            name += " (baseline)" if r.baseline else ""
            cells = [f"{100 * target:.1f}%", name, f"{100 * getattr(r, saved):.1f}%"]
            cells += [fmt_ratio(r, t) for t in texts] + [r.plan]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def verdicts(rows: list[Row], kind: str, texts: list[str]) -> list[str]:
    """One sentence per target: does the best sharing plan beat the better removal baseline, on every text?"""
    out = []
    for target in sorted({r.target for r in rows if r.kind == kind}):
        at = [r for r in rows if r.kind == kind and r.target == target]
        shared = [r for r in at if not r.baseline]
        removal = [r for r in at if r.baseline]
        if not shared or not removal:
            continue
        parts = []
        for t in texts:
            best, base = min(shared, key=lambda r: r.ratio[t]), min(removal, key=lambda r: r.ratio[t])
            gap = best.ratio[t] - base.ratio[t]
            verb = "ties with" if abs(gap) < 5e-4 else "beats" if gap < 0 else "loses to"  # equal as printed
            parts.append(f"on {t} the best sharing plan ({best.method}, ×{best.ratio[t]:.3f}) {verb} the better "
                         f"baseline ({base.method}, ×{base.ratio[t]:.3f})")
        out.append(f"- {100 * target:.1f}% of the {KINDS[kind]}: " + "; ".join(parts) + ".")
    return out


def same_layers_table(rows: list[Row], texts: list[str]) -> list[str]:
    sa = {r.target: r for r in rows if r.kind == "kv" and r.method == "sa"}
    drop = {r.target: r for r in rows if r.kind == "same layers"}
    if not drop:
        return []
    head = ["SA receivers", "KV saved (SA / drop)"] + [f"SA ×base ({t})" for t in texts] + \
        [f"drop same layers ×base ({t})" for t in texts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for target in sorted(drop):
        s, d = sa[target], drop[target]
        cells = [s.plan, f"{100 * s.kv_saved:.1f}% / {100 * d.kv_saved:.1f}%"]
        cells += [fmt_ratio(s, t) for t in texts] + [fmt_ratio(d, t) for t in texts]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(base: Base, rows: list[Row], config: CompareConfig) -> str:
    texts = config.texts
    lines = [f"Perplexity on the first {config.max_tokens} tokens of each text in {config.window}-token windows; base: "
             + ", ".join(f"{t} {base.ppl[t]:.3f}" for t in texts) + ". Savings are measured (cache tensors, "
             "parameter count), not nominal. Bold: the best plan at that target on " + texts[0] + ".", ""]
    for kind in ("kv", "params"):
        table = equal_savings_table(rows, kind, texts)
        if table:
            lines += [f"### At equal {KINDS[kind]} saved", "", *table, "", *verdicts(rows, kind, texts), ""]
    same = same_layers_table(rows, texts)
    if same:
        lines += ["### Same layers (the papers' comparison; not equal savings: drop also frees V)", "", *same, ""]
    extra = [r for r in rows if r.kind == "artifact"]
    if extra:
        lines += ["### Artifacts", "", "| variant | KV saved | params saved | " +
                  " | ".join(f"ppl ×base ({t})" for t in texts) + " | plan |", "|---|---|---|" + "---|" * len(texts) + "---|"]
        lines += [f"| {r.method} | {100 * r.kv_saved:.1f}% | {100 * r.params_saved:.1f}% | " +
                  " | ".join(fmt_ratio(r, t) for t in texts) + f" | {r.plan} |" for r in extra]
        lines.append("")
    return "\n".join(lines)


def plots(rows: list[Row], text: str, out: Path) -> list[Path]:
    """Pareto plots of ppl ratio on ``text`` against KV saved and against parameters saved: all rows, both axes."""
    paths = []
    for kind, attr in (("kv", "kv_saved"), ("params", "params_saved")):
        points = [Point(r.method, f"{100 * r.target:.3g}%" if r.target else "", getattr(r, attr), r.ratio[text])
                  for r in rows if r.kind != "same layers"]
        if not any(p.saving > 0 for p in points):
            continue
        finite = [p for p in points if math.isfinite(p.ppl_ratio)]
        paths.append(pareto_plot(finite, out / f"pareto-{kind}.png", xlabel=f"{KINDS[kind]} saved (%)",
                                 title=f"perplexity on {text} vs {KINDS[kind]} saved"))
    return paths


def write_compare(base: Base, rows: list[Row], config: CompareConfig, out: str | Path, *,
                  plot: bool = True) -> Path:
    """compare.md, compare.json and (with matplotlib) pareto-kv.png / pareto-params.png into ``out``."""

    def write(tmp: Path) -> None:
        (tmp / "compare.md").write_text(markdown(base, rows, config) + "\n")
        payload = {"config": asdict(config), "base": asdict(base), "rows": [r.to_dict() for r in rows]}
        (tmp / "compare.json").write_text(json.dumps(payload, indent=2) + "\n")
        if plot:
            plots(rows, config.texts[0], tmp)

    return write_folder(Path(out), write)
