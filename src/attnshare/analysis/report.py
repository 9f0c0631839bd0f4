"""Write an analysis: raw numbers (JSON + safetensors) and heatmaps (PNG, needs the ``plot`` extra)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import require
from ..paths import write_file

if TYPE_CHECKING:
    from .analyze import Analysis


def save_analysis(analysis: Analysis, out_dir, plots: bool = True) -> list[Path]:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "analysis.json", out / "analysis.safetensors"]
    write_file(paths[0], lambda t: Path(t).write_text(json.dumps(analysis.to_dict(), indent=1) + "\n"))
    write_file(paths[1], lambda t: save_file(analysis.tensors(), t))
    if plots:
        paths += plot_analysis(analysis, out)
    return paths


def head_pairs_to_plot(analysis: Analysis, count: int = 3) -> list[tuple[int, int]]:
    """Adjacent pairs spread over depth (shallow, middle, deep)."""
    adjacent = sorted(p for p in analysis.head_js if p[1] - p[0] == 1)
    if len(adjacent) <= count:
        return adjacent
    return [adjacent[round(i * (len(adjacent) - 1) / (count - 1))] for i in range(count)]


def plot_analysis(analysis: Analysis, out: Path) -> list[Path]:
    """Heatmaps: layer x layer (JS and cosine), head x head for a few adjacent pairs, sensitivity bars, weights."""
    require("matplotlib", "plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    skip = analysis.config.skip_rows

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, (name, mat) in zip(axes, [("1 - JS/ln2", analysis.layer_js), ("cosine", analysis.layer_cosine)]):
        im = ax.imshow(mat.numpy(), cmap="viridis", vmin=float(mat.min()), vmax=1.0)
        ax.set_title(f"layer x layer attention similarity ({name})", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{analysis.model}: {analysis.config.tokens} calibration tokens of '{analysis.config.text}', "
                 f"first {skip} query rows skipped", fontsize=9)
    paths.append(_save(fig, out / "layer_similarity.png", plt))

    pairs = head_pairs_to_plot(analysis)
    if pairs:
        summary = {(r["earlier"], r["later"]): r for r in analysis.head_summary()}
        fig, axes = plt.subplots(1, len(pairs), figsize=(3.6 * len(pairs), 3.6), squeeze=False)
        for ax, pair in zip(axes[0], pairs):
            sim = analysis.head_js[pair].numpy()
            ax.imshow(sim, cmap="viridis", vmin=0, vmax=1)
            perm = summary[pair]["permutation"]
            ax.scatter(perm, range(len(perm)), marker="o", facecolors="none", edgecolors="red", s=60, label="Hungarian")
            ax.set_title(f"heads {pair[1]} (rows) vs {pair[0]} (cols)\nunaligned {summary[pair]['unaligned']:.3f}, "
                         f"aligned {summary[pair]['aligned']:.3f}", fontsize=8)
            ax.set_xlabel(f"layer {pair[0]} head")
            ax.set_ylabel(f"layer {pair[1]} head")
        paths.append(_save(fig, out / "head_similarity.png", plt))

    rows = analysis.head_summary()
    adjacent = [r for r in rows if r["later"] - r["earlier"] == 1]
    if adjacent:
        fig, ax = plt.subplots(figsize=(8, 3.2))
        xs = [r["later"] for r in adjacent]
        ax.plot(xs, [r["unaligned"] for r in adjacent], "o-", label="same head index (unaligned)")
        ax.plot(xs, [r["aligned"] for r in adjacent], "s-", label="Hungarian head map (aligned)")
        ax.set_xlabel("layer l (compared with l-1)")
        ax.set_ylabel("mean head 1 - JS/ln2")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out / "head_alignment.png", plt))

    if analysis.sensitivity:
        fig, ax = plt.subplots(figsize=(8, 3.2))
        layers = [r["layer"] for r in analysis.sensitivity]
        width = 0.4
        ax.bar([x - width / 2 for x in layers], [r["kl_unaligned"] for r in analysis.sensitivity], width,
               label="unaligned (same head index)")
        ax.bar([x + width / 2 for x in layers], [r["kl_aligned"] for r in analysis.sensitivity], width,
               label="aligned (Hungarian)")
        if any(r["kl_unaligned"] > 0 or r["kl_aligned"] > 0 for r in analysis.sensitivity):
            ax.set_yscale("log")  # KLs span decades; a model whose every KL is 0 (tiny random ones) keeps a linear axis
        ax.set_xlabel("layer reusing its predecessor's attention")
        ax.set_ylabel("KL(base || shared), nats/token")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        paths.append(_save(fig, out / "sensitivity.png", plt))

    if analysis.weights is not None:
        w = analysis.weights
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        score = w.score.clone()
        im = axes[0].imshow(score.T.numpy(), aspect="auto", cmap="magma")
        axes[0].set_title(f"best-match cosine per {w.unit_kind} ({w.match})", fontsize=9)
        axes[0].set_xlabel("layer")
        axes[0].set_ylabel(w.unit_kind)
        axes[0].set_yticks(range(score.shape[1]))
        fig.colorbar(im, ax=axes[0], fraction=0.046)
        here = torch.arange(score.shape[0])[:, None].expand_as(w.layer)
        distance = (here - w.layer)[1:].flatten()
        axes[1].hist(distance.numpy(), bins=range(1, int(distance.max()) + 2), align="left")
        axes[1].set_title("distance to the best-matching layer", fontsize=9)
        axes[1].set_xlabel("layers back")
        axes[1].set_ylabel(f"{w.unit_kind}s")
        paths.append(_save(fig, out / "weight_similarity.png", plt))
    return paths


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    write_file(path, lambda t: fig.savefig(t, dpi=80, format="png"))
    plt.close(fig)
    return path
