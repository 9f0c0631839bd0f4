"""Report plots (matplotlib, the ``plot`` extra): quality against savings for every method and budget."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import require


@dataclass(frozen=True)
class Point:
    """One variant on the Pareto plot: what it saves (fraction of the base) and what it costs (ppl ratio)."""

    method: str
    label: str
    saving: float  # fraction saved, 0..1 (KV cache or parameters)
    ppl_ratio: float  # ppl / base ppl


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """Points no other point beats on both axes (more saving and lower ppl ratio), by increasing saving."""
    front = []
    for p in sorted(points, key=lambda p: (-p.saving, p.ppl_ratio)):
        if not front or p.ppl_ratio < front[-1].ppl_ratio:
            front.append(p)
    return sorted(front, key=lambda p: p.saving)


def pareto_plot(points: Sequence[Point], path: str | Path, *, xlabel: str, title: str) -> Path:
    """Scatter of ppl ratio vs saving, one colour per method, the Pareto front drawn as a step line."""
    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for method in dict.fromkeys(p.method for p in points):
        mine = [p for p in points if p.method == method]
        ax.scatter([100 * p.saving for p in mine], [p.ppl_ratio for p in mine], label=method, s=36, zorder=3)
        for p in mine:
            ax.annotate(p.label, (100 * p.saving, p.ppl_ratio), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = pareto_front(points)
    if len(front) > 1:
        ax.step([100 * p.saving for p in front], [p.ppl_ratio for p in front], where="post", color="grey",
                linewidth=1, linestyle="--", label="Pareto front", zorder=2)
    ax.axhline(1.0, color="black", linewidth=0.6)
    return finish(fig, ax, path, xlabel, "perplexity / base perplexity (lower is better)", title)


def finish(fig, ax, path: str | Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label, lay out, write and close a figure; returns its path."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def curve_plot(series: dict[str, Sequence[tuple[float, float]]], path: str | Path, *, xlabel: str, ylabel: str,
               title: str, logx: bool = False, reference: float | None = None) -> Path:
    """One line per series of (x, y) points (e.g. ppl ratio against training minutes), ``reference`` drawn as a
    horizontal line (the base model)."""
    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for label, points in series.items():
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", label=label, zorder=3)
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{y:.3f}", (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    if reference is not None:
        ax.axhline(reference, color="black", linewidth=0.6)
    if logx:
        ax.set_xscale("log")
    return finish(fig, ax, path, xlabel, ylabel, title)
