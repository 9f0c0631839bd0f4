"""Planners: turn measured attention similarity and sensitivity into plans.

- :func:`head_maps_for`: best one-to-one receiver-head -> donor-head assignment (Hungarian on 1 - JS/ln2).
- :func:`choose_lisa_layers`: the layers LiSA replaces, the least sensitive ones (measured), never layer 0.
- :func:`plan_sa`: SA receivers under a budget, by greedy forward selection on the measured KL of candidate plans.

Calibration statistics use the first ``tokens`` tokens of the calibration text (``plays`` by default); KL is
measured on the held-out tokens that follow them. The evaluation texts (britannica, hamlet) are refused.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import geometry
from ..errors import AttnshareError
from ..methods.sa.config import SAConfig
from ..methods.sa.plan import SAPlan, nearest_donors
from .collect import calibration_blocks, check_base_model, model_tokenizer
from .metrics import best_permutation
from .sensitivity import Divergence, forward_logprobs, plan_divergence
from .stats import Pair, collect_stats

log = logging.getLogger(__name__)

DEFAULT_SKIP = 16  # query rows skipped in similarity: the first rows see few keys and are trivially similar


def head_similarity(model: nn.Module, pairs: list[Pair], *, text: str = "plays", tokens: int = 1024,
                    seq_len: int = 512, skip: int = DEFAULT_SKIP, progress: bool = False,
                    tokenizer=None) -> dict[Pair, torch.Tensor]:
    """Mean 1 - JS/ln2 between every head of the later and the earlier layer of each (earlier, later) pair: (H, H)
    indexed [later head, earlier head], streamed over calibration blocks."""
    check_base_model(model)
    blocks = calibration_blocks(model, text, tokens, seq_len, tokenizer=tokenizer)
    skip = min(skip, seq_len // 4)
    stats = collect_stats(model, blocks, head_pairs=list(pairs), layer_pairs=False, skip=skip, progress=progress)
    return {pair: stats.head_js(pair) for pair in stats.head_pairs}


def head_maps_for(model: nn.Module, donors: dict[int, int], *, text: str = "plays", tokens: int = 1024,
                  seq_len: int = 512) -> dict[int, list[int]]:
    """For each receiver r with donor d: ``maps[r][h]`` = the donor head receiver head h should use.

    The best one-to-one assignment (Hungarian) maximising head similarity 1 - JS/ln2 over calibration tokens.
    """
    if not donors:
        return {}
    pairs = [(d, r) for r, d in donors.items()]
    for d, r in pairs:
        if not d < r:
            raise AttnshareError(f"Layer {r} cannot reuse layer {d}: a donor must come before its receiver.")
    sims = head_similarity(model, pairs, text=text, tokens=tokens, seq_len=seq_len)
    return {r: best_permutation(sims[(d, r)]) for r, d in sorted(donors.items())}


class PlanProbe:
    """Measures candidate plans on one model: calibration blocks, held-out reference log-probs, cached head maps."""

    def __init__(self, model: nn.Module, *, text: str = "plays", tokens: int = 1024, seq_len: int = 512,
                 heldout: int = 512, progress: bool = False, tokenizer=None) -> None:
        check_base_model(model)
        self.model, self.text, self.tokens, self.seq_len, self.progress = model, text, tokens, seq_len, progress
        self.tokenizer = tokenizer if tokenizer is not None else model_tokenizer(model)
        self.geo = geometry(model)
        seq = min(seq_len, heldout)
        self.heldout = calibration_blocks(model, text, heldout, seq, offset=tokens, tokenizer=tokenizer)  # (N, T)
        self.reference = forward_logprobs(model, self.heldout)
        self._head_maps: dict[Pair, list[int]] = {}
        self.measured = 0

    def known_similarity(self, sims: dict[Pair, torch.Tensor]) -> None:
        """Reuse head similarities measured elsewhere (same calibration tokens) instead of recomputing them."""
        self._head_maps.update({pair: best_permutation(sim) for pair, sim in sims.items()})

    def head_maps(self, donors: dict[int, int]) -> dict[int, list[int]]:
        """Head maps for ``donors``; missing (donor, receiver) pairs are computed in one calibration pass."""
        missing = sorted({(d, r) for r, d in donors.items()} - set(self._head_maps))
        if missing:
            sims = head_similarity(self.model, missing, text=self.text, tokens=self.tokens, seq_len=self.seq_len,
                                   tokenizer=self.tokenizer, progress=self.progress)
            self._head_maps.update({pair: best_permutation(sim) for pair, sim in sims.items()})
        return {r: self._head_maps[(d, r)] for r, d in donors.items()}

    def sa_plan(self, receivers: list[int], aligned: bool, fused_prefill: bool = True) -> SAPlan:
        plan = SAPlan(donors=nearest_donors(sorted(receivers), self.geo), fused_prefill=fused_prefill)
        if aligned:
            plan.head_map = self.head_maps(plan.donors)
        return plan

    def measure(self, plan: SAPlan) -> Divergence:
        self.measured += 1
        return plan_divergence(self.model, plan, self.heldout, self.reference)

    def valid_receivers(self, chosen: list[int]) -> list[int]:
        """Layers that can join ``chosen`` as SA receivers (a same-kind non-receiver layer exists before them)."""
        out = []
        for layer in range(1, self.geo.num_layers):
            if layer in chosen:
                continue
            try:
                nearest_donors(sorted([*chosen, layer]), self.geo)
            except AttnshareError:
                continue
            out.append(layer)
        return out

    def single_layer(self, layers: list[int], aligned: bool, desc: str = "sensitivity") -> dict[int, Divergence]:
        """Each layer alone reusing its nearest same-kind predecessor's attention."""
        if aligned:  # all head maps in one calibration pass
            self.head_maps({r: d for r in layers for d in nearest_donors([r], self.geo).values()})
        return {layer: self.measure(self.sa_plan([layer], aligned))
                for layer in tqdm(layers, desc=desc, unit="layer", disable=not self.progress, leave=False)}


def lisa_count(fraction: float, num_layers: int) -> int:
    """How many LiSA layers ``fraction`` asks for; refuses fractions outside (0, 1) or with no valid choice."""
    if not 0.0 < fraction < 1.0:
        raise AttnshareError(f"The LiSA fraction must lie strictly between 0 and 1 (got {fraction}).")
    count = round(fraction * num_layers)
    if not 1 <= count <= num_layers - 1:
        raise AttnshareError(
            f"A fraction of {fraction} of {num_layers} layers gives {count} LiSA layers, but 1..{num_layers - 1} are "
            "possible (layer 0 stays standard); choose another fraction."
        )
    return count


def choose_lisa_layers(model: nn.Module, fraction: float, *, text: str = "plays", tokens: int = 1024,
                       seq_len: int = 512, heldout: int = 512, progress: bool = True) -> list[int]:
    """The ``round(fraction * L)`` layers that become LiSA layers (each reuses layer l-1), never layer 0.

    Ranked by measured sensitivity: the KL on held-out calibration tokens when the layer alone reuses its
    predecessor's attention with heads aligned (what LiSA starts from); the least sensitive layers are chosen, so
    fragile (typically shallow) layers stay standard.
    """
    geo = geometry(model)
    count = lisa_count(fraction, geo.num_layers)
    probe = PlanProbe(model, text=text, tokens=tokens, seq_len=seq_len, heldout=heldout, progress=progress)
    candidates = probe.valid_receivers([])
    if len(candidates) < count:
        raise AttnshareError(
            f"Only {len(candidates)} layers can reuse an earlier layer's attention, fewer than the {count} asked; "
            "choose a smaller fraction."
        )
    scores = probe.single_layer(candidates, aligned=True, desc="LiSA layer sensitivity")
    ranked = sorted(candidates, key=lambda layer: (scores[layer].kl, layer))
    chosen = sorted(ranked[:count])
    log.info("LiSA layers %s (KL %s)", chosen, {l: round(scores[l].kl, 4) for l in chosen})
    return chosen


def sa_budget(config: SAConfig, num_layers: int) -> int:
    """Receivers the config asks for: ``budget`` layers, or enough to save ``kv_saving`` of the KV cache."""
    count = config.budget if config.budget else math.ceil(config.kv_saving * 2 * num_layers - 1e-9)
    if not 1 <= count <= num_layers - 1:
        raise AttnshareError(
            f"An SA budget of {count} receivers is out of range for a {num_layers}-layer model; ask for "
            f"1..{num_layers - 1} receivers (each saves 1/{2 * num_layers} of the KV cache)."
        )
    return count


def plan_sa(model: nn.Module, config: SAConfig, *, progress: bool = True) -> SAPlan:
    """SA receivers and donors under ``config``'s budget, chosen by measurement (see :func:`plan_sa_curve`)."""
    budget = sa_budget(config, geometry(model).num_layers)
    return plan_sa_curve(model, config, [budget], progress=progress)[budget]


def plan_sa_curve(model: nn.Module, config: SAConfig, budgets: list[int], *,
                  progress: bool = True) -> dict[int, SAPlan]:
    """SA plans for several receiver budgets from ONE greedy selection run up to ``max(budgets)``.

    Greedy forward selection: every valid layer is first measured alone (its KL on held-out calibration tokens
    when it reuses its nearest earlier non-receiver); then receivers are added one at a time, each time the
    shortlisted candidate whose addition gives the smallest KL of the whole plan (donors: nearest earlier
    non-receiver; heads aligned with the Hungarian maps when ``config.align_heads``). The plan for budget N is the
    first N receivers chosen, so the plans are nested and cost one selection run in all.
    """
    geo = geometry(model)
    for budget in budgets:
        sa_budget(SAConfig(budget=budget), geo.num_layers)  # range check
    top = max(budgets)
    probe = PlanProbe(model, text=config.calib_text, tokens=config.calib_tokens, seq_len=config.calib_seq_len,
                      heldout=config.heldout_tokens, progress=progress)
    candidates = probe.valid_receivers([])
    if len(candidates) < top:
        raise AttnshareError(
            f"Only {len(candidates)} layers of this model can be SA receivers, fewer than the budget of {top}; "
            "ask for fewer receivers."
        )
    aligned = config.align_heads
    single = probe.single_layer(candidates, aligned, desc="SA single-layer sensitivity")
    log.info("SA single-layer KL: %s", {layer: round(d.kl, 4) for layer, d in single.items()})
    shortlist_size = config.shortlist or top + 8
    shortlist = sorted(candidates, key=lambda layer: (single[layer].kl, layer))[:max(shortlist_size, top)]
    best = min(shortlist, key=lambda layer: (single[layer].kl, layer))
    chosen, score = [best], single[best]
    plans = {}
    steps = tqdm(range(top), desc="SA greedy selection", unit="receiver", disable=not progress, leave=False)
    for _ in steps:
        if len(chosen) in budgets:
            plans[len(chosen)] = probe.sa_plan(chosen, aligned, fused_prefill=config.fused_prefill)
            log.info("SA plan %s (KL %.4f, held-out ppl %.3f)", plans[len(chosen)].summary(), score.kl, score.ppl)
        if len(chosen) == top:
            break
        options = [layer for layer in probe.valid_receivers(chosen) if layer in shortlist]
        if not options:
            raise AttnshareError(f"No valid SA receiver is left after {chosen}; ask for fewer receivers.")
        trials = {layer: probe.measure(probe.sa_plan([*chosen, layer], aligned)) for layer in options}
        best = min(options, key=lambda layer: (trials[layer].kl, layer))
        chosen.append(best)
        score = trials[best]
    log.info("SA planning measured %d plans", probe.measured)
    return plans
