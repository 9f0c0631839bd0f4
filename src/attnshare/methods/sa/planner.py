"""SA's planner: receivers under a budget, by greedy forward selection on the measured KL of candidate plans.

:class:`PlanProbe` measures candidate SA plans on one model (KL on held-out calibration tokens that follow the
calibration tokens, against the unshared model); LiSA's layer choice and the analysis' sensitivity reuse it.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ...analysis.heads import head_similarity
from ...analysis.metrics import best_permutation
from ...analysis.sensitivity import Divergence, Probe, greedy_select
from ...analysis.stats import Pair
from ...arch import geometry
from ...errors import AttnshareError
from ...plan import units_for
from ...progress import progress_bar
from .config import SAConfig
from .plan import SAPlan, nearest_donors

log = logging.getLogger(__name__)


class PlanProbe(Probe):
    """A :class:`~attnshare.analysis.sensitivity.Probe` that also makes SA plans (with cached head maps)."""

    def __init__(self, model: nn.Module, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self._head_maps: dict[Pair, list[int]] = {}

    def known_similarity(self, sims: dict[Pair, torch.Tensor]) -> None:
        """Reuse head similarities measured elsewhere (same calibration tokens) instead of recomputing them."""
        self._head_maps.update({pair: best_permutation(sim) for pair, sim in sims.items()})

    def head_map_pairs(self, pairs: list[Pair]) -> None:
        """Compute the head maps of the (donor, receiver) ``pairs`` not known yet, in one calibration pass."""
        missing = sorted(set(pairs) - set(self._head_maps))
        if missing:
            sims = head_similarity(self.model, missing, text=self.text, tokens=self.tokens, seq_len=self.seq_len,
                                   tokenizer=self.tokenizer, progress=self.progress)
            self._head_maps.update({pair: best_permutation(sim) for pair, sim in sims.items()})

    def head_maps(self, donors: dict[int, int]) -> dict[int, list[int]]:
        """Head maps for ``donors``; missing (donor, receiver) pairs are computed in one calibration pass."""
        self.head_map_pairs([(d, r) for r, d in donors.items()])
        return {r: self._head_maps[(d, r)] for r, d in donors.items()}

    def sa_plan(self, receivers: list[int], aligned: bool, fused_prefill: bool = True) -> SAPlan:
        plan = SAPlan(donors=nearest_donors(sorted(receivers), self.geo), fused_prefill=fused_prefill)
        if aligned:
            plan.head_map = self.head_maps(plan.donors)
        return plan

    def likely_pairs(self, receivers: list[int]) -> list[Pair]:
        """(donor, receiver) pairs of each of ``receivers`` alone, and with its donor a receiver too: the pairs a
        greedy selection meets unless it chains three receivers (those are computed when met)."""
        pairs = []
        for receiver in receivers:
            donor = nearest_donors([receiver], self.geo)[receiver]
            pairs.append((donor, receiver))
            with contextlib.suppress(AttnshareError):  # the donor cannot be a receiver itself (layer 0)
                pairs.append((nearest_donors([donor, receiver], self.geo)[receiver], receiver))
        return pairs

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
                for layer in progress_bar(layers, desc=desc, unit="layer", show=self.progress, leave=False)}


def sa_budget(config: SAConfig, num_layers: int) -> int:
    """Receivers the config asks for: ``budget`` layers, or enough to save ``kv_saving`` of the KV cache."""
    count = config.budget if config.budget else units_for(config.kv_saving * 2 * num_layers)
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
    probe = PlanProbe.of(model, config, progress)
    candidates = probe.valid_receivers([])
    if len(candidates) < top:
        raise AttnshareError(
            f"Only {len(candidates)} layers of this model can be SA receivers, fewer than the budget of {top}; "
            "ask for fewer receivers."
        )
    aligned = config.align_heads
    if aligned:  # the head maps a selection meets, in one calibration pass
        probe.head_map_pairs(probe.likely_pairs(candidates))

    def score(receivers: list[int], screen: bool = False) -> Divergence:
        return probe.measure(probe.sa_plan(receivers, aligned), screen=screen)

    steps = greedy_select(score, candidates, top, valid=probe.valid_receivers, shortlist=config.shortlist,
                          width=config.greedy_width, screen=probe.screener(score), progress=progress,
                          desc="SA greedy selection")
    plans = {}
    for budget in budgets:
        step = steps[budget - 1]
        plans[budget] = probe.sa_plan(step.chosen, aligned, fused_prefill=config.fused_prefill)
        log.info("SA plan %s (KL %.4f, held-out ppl %.3f)", plans[budget].summary(), step.score.kl, step.score.ppl)
    log.info("SA planning measured %d plans", probe.measured)
    return plans
