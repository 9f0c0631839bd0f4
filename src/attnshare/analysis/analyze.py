"""``attnshare.analyze``: attention similarity (layers, heads), weight similarity and sensitivity in one run.

Writes nothing by itself; :meth:`Analysis.save` writes the raw numbers (JSON + safetensors) and the heatmaps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..arch import geometry
from ..errors import AttnshareError
from ..methods.directshare.planner import best_matches, match_statistics
from ..methods.sa.planner import PlanProbe
from .collect import calibration_blocks, check_base_model, check_calibration_text
from .metrics import best_match, best_permutation
from .report import save_analysis
from .sensitivity import divergence
from .stats import collect_stats

log = logging.getLogger(__name__)


@dataclass
class AnalyzeConfig:
    """What `attnshare analyze` measures. Calibration reads the first tokens of the text; sensitivity the next ones."""

    text: str = field(default="plays", metadata={"help": "calibration text (never an evaluation text: britannica, hamlet)"})
    tokens: int = field(default=1024, metadata={"help": "calibration tokens for attention statistics"})
    seq_len: int = field(default=512, metadata={"help": "calibration sequence length (tokens per block)"})
    skip_rows: int = field(default=16, metadata={"help": "first query rows left out of similarity (trivially similar)"})
    head_window: int = field(
        default=1, metadata={"help": "head x head similarity for layer pairs up to this distance apart (1: adjacent)"}
    )
    sensitivity_every: int = field(
        default=1, metadata={"help": "measure sensitivity on every N-th layer (0: skip sensitivity)"}
    )
    heldout_tokens: int = field(default=512, metadata={"help": "held-out tokens (after the calibration ones) for sensitivity"})
    weight_match: str = field(
        default="qk", metadata={"help": "match function for weight similarity: q, k, v, qk, qkv, o ('none' skips it)"}
    )

    def __post_init__(self) -> None:
        check_calibration_text(self.text)
        if self.tokens < self.seq_len or self.seq_len < 2:
            raise AttnshareError(f"--tokens ({self.tokens}) must be at least --seq-len ({self.seq_len}), which must be at least 2.")
        if not 0 <= self.skip_rows < self.seq_len - 1:
            raise AttnshareError(f"--skip-rows must lie in 0..{self.seq_len - 2} for {self.seq_len}-token blocks.")
        if self.head_window < 1 or self.sensitivity_every < 0 or self.heldout_tokens < 2:
            raise AttnshareError("--head-window must be at least 1, --sensitivity-every at least 0 and --heldout-tokens at least 2.")


@dataclass
class Analysis:
    """Everything one analysis measured. Matrices are float64 tensors; see :meth:`to_dict` for the JSON layout."""

    config: AnalyzeConfig
    model: str
    num_layers: int
    num_heads: int
    layer_js: torch.Tensor  # (L, L) mean 1 - JS/ln2, head h with head h
    layer_cosine: torch.Tensor  # (L, L)
    mean_map_js: torch.Tensor  # (L, L) 1 - JS/ln2 of head-averaged maps
    head_js: dict[tuple[int, int], torch.Tensor]  # (earlier, later) -> (H, H) [later head, earlier head]
    head_cosine: dict[tuple[int, int], torch.Tensor]
    sensitivity: list[dict[str, float]] = field(default_factory=list)  # per measured layer
    base_heldout_ppl: float | None = None
    weights: Any = None  # analysis.weights.WeightMatches, when computed
    weight_stats: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def head_summary(self) -> list[dict[str, Any]]:
        """Per head pair: unaligned (same index) vs aligned (Hungarian) mean similarity, best match and permutation."""
        rows = []
        for (a, b), sim in sorted(self.head_js.items()):
            perm = best_permutation(sim)
            values, index = best_match(sim)
            h = sim.shape[0]
            rows.append({
                "earlier": a, "later": b,
                "unaligned": float(torch.diagonal(sim).mean()),
                "aligned": float(sum(sim[i, perm[i]] for i in range(h)) / h),
                "best_match": index.tolist(), "best_match_similarity": values.tolist(),
                "permutation": perm, "identity_heads": sum(int(perm[i] == i) for i in range(h)),
            })
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "num_layers": self.num_layers, "num_heads": self.num_heads,
            "config": asdict(self.config),
            "notes": {
                "skip_rows": f"the first {self.config.skip_rows} query rows of every block are left out of similarity",
                "head_js": "[later head][earlier head] mean 1 - JS/ln2",
                "layer_js": "mean over rows and heads of 1 - JS/ln2, head h of one layer with head h of the other",
                "mean_map_js": "1 - JS/ln2 between head-averaged maps (coarser; higher than layer_js)",
                "sensitivity": "KL(base || shared) of next-token distributions, nats/token, on held-out calibration "
                "tokens, when the layer alone reuses its nearest earlier layer's attention (SA), same head index "
                "(unaligned) or Hungarian head map (aligned)",
            },
            "layer_js": self.layer_js.tolist(),
            "layer_cosine": self.layer_cosine.tolist(),
            "mean_map_js": self.mean_map_js.tolist(),
            "adjacent_js": torch.diagonal(self.layer_js, 1).tolist(),
            "adjacent_mean_map_js": torch.diagonal(self.mean_map_js, 1).tolist(),
            "adjacent_cosine": torch.diagonal(self.layer_cosine, 1).tolist(),
            "heads": self.head_summary(),
            "head_js": {f"{a}-{b}": m.tolist() for (a, b), m in sorted(self.head_js.items())},
            "sensitivity": self.sensitivity,
            "base_heldout_ppl": self.base_heldout_ppl,
            "weights": self.weights.to_dict() if self.weights is not None else None,
            "weight_stats": self.weight_stats,
            "seconds": self.seconds,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"layer_js": self.layer_js, "layer_cosine": self.layer_cosine, "mean_map_js": self.mean_map_js}
        out |= {f"head_js.{a}-{b}": m for (a, b), m in self.head_js.items()}
        out |= {f"head_cosine.{a}-{b}": m for (a, b), m in self.head_cosine.items()}
        if self.sensitivity:
            keys = ("layer", "kl_unaligned", "kl_aligned", "ppl_unaligned", "ppl_aligned")
            out["sensitivity"] = torch.tensor([[row[k] for k in keys] for row in self.sensitivity], dtype=torch.float64)
        if self.weights is not None:
            out |= {"weights.score": self.weights.score, "weights.layer": self.weights.layer,
                    "weights.unit": self.weights.unit}
        return {k: v.contiguous() for k, v in out.items()}

    def save(self, out_dir, plots: bool = True) -> list:
        """Write ``analysis.json``, ``analysis.safetensors`` and (with matplotlib) the heatmaps; returns the paths."""
        return save_analysis(self, out_dir, plots=plots)


def weight_section(model: nn.Module, match: str):
    """Best weight matches and their summary, or (None, {}) for ``match == "none"``."""
    if match == "none":
        return None, {}
    matches = best_matches(model, match)
    return matches, match_statistics(matches)


def analyze(model: nn.Module, config: AnalyzeConfig | None = None, *, tokenizer=None, progress: bool = True) -> Analysis:
    """Measure attention similarity, head alignment, weight similarity and (optionally sampled) sensitivity."""
    config = config or AnalyzeConfig()
    check_base_model(model)
    geo = geometry(model)
    seconds = {}
    start = time.perf_counter()
    blocks = calibration_blocks(model, config.text, config.tokens, config.seq_len, tokenizer=tokenizer)
    pairs = [(a, b) for b in range(geo.num_layers) for a in range(max(0, b - config.head_window), b)]
    stats = collect_stats(model, blocks, head_pairs=pairs, skip=config.skip_rows, progress=progress)
    seconds["attention_statistics"] = time.perf_counter() - start
    start = time.perf_counter()
    matches, weight_stats = weight_section(model, config.weight_match)
    seconds["weights"] = time.perf_counter() - start
    result = Analysis(
        config=config, model=str(getattr(model.config, "attnshare_base", "") or model.config.model_type),
        num_layers=geo.num_layers, num_heads=geo.num_heads, layer_js=stats.layer_js(),
        layer_cosine=stats.layer_cosine(), mean_map_js=stats.mean_map_js(), head_js={p: stats.head_js(p) for p in stats.head_pairs},
        head_cosine={p: stats.head_cosine(p) for p in stats.head_pairs}, weights=matches, weight_stats=weight_stats,
    )
    if config.sensitivity_every:
        start = time.perf_counter()
        result.sensitivity, result.base_heldout_ppl = measure_sensitivity(
            model, config, tokenizer, progress, head_js=result.head_js
        )
        seconds["sensitivity"] = time.perf_counter() - start
    result.seconds = seconds
    return result


def measure_sensitivity(model: nn.Module, config: AnalyzeConfig, tokenizer=None, progress: bool = True,
                        head_js: dict[tuple[int, int], torch.Tensor] | None = None) -> tuple[list[dict[str, float]], float]:
    """Per sampled layer l >= 1: KL and ppl when l alone reuses its nearest same-kind earlier layer's attention.

    ``head_js`` (already measured head similarities) saves recomputing the head maps of those pairs.
    """
    probe = PlanProbe(model, text=config.text, tokens=config.tokens, seq_len=config.seq_len,
                      heldout=config.heldout_tokens, progress=progress, tokenizer=tokenizer)
    probe.known_similarity(head_js or {})
    base = divergence(model, probe.heldout, probe.reference)  # KL 0; the base model's held-out ppl
    layers = [l for l in probe.valid_receivers([]) if l % config.sensitivity_every == 0 or config.sensitivity_every == 1]
    unaligned = probe.single_layer(layers, aligned=False, desc="sensitivity (unaligned)")
    aligned = probe.single_layer(layers, aligned=True, desc="sensitivity (aligned)")
    rows = []
    for layer in layers:
        donor = probe.sa_plan([layer], aligned=False).donors[layer]
        rows.append({"layer": layer, "donor": donor, "kl_unaligned": unaligned[layer].kl, "kl_aligned": aligned[layer].kl,
                     "ppl_unaligned": unaligned[layer].ppl, "ppl_aligned": aligned[layer].ppl})
    return rows, base.ppl
