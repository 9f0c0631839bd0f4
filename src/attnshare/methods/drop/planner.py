"""Planner of the removal baselines (drop: attention sublayers; layerdrop: whole blocks): how many layers a budget
asks for, and which, by greedy selection on measured KL or by one pass of block influence (ShortGPT).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...analysis.collect import calibration_blocks
from ...analysis.sensitivity import Divergence, Probe, greedy_select, hidden_input, run_hooked
from ...arch import attention, decoder_layers, geometry
from ...errors import AttnshareError
from ...plan import Plan, units_for
from .config import RemovalConfig

log = logging.getLogger(__name__)


def removal_count(config: RemovalConfig, num_layers: int, layer_params: int, total_params: int) -> int:
    """Layers the config asks to remove: ``budget``; or the fewest that save ``kv_saving`` of the KV cache (1/L
    each) or ``param_saving`` of the parameters (``layer_params`` each)."""
    if config.budget:
        count = config.budget
    elif config.kv_saving:
        count = units_for(config.kv_saving * num_layers)
    elif config.param_saving:
        count = units_for(config.param_saving * total_params / layer_params)
    else:
        raise AttnshareError("Give --layers, --budget N, --kv-saving F or --param-saving F to choose what to remove.")
    if not 1 <= count <= num_layers - 1:
        raise AttnshareError(
            f"The budget asks to remove {count} of {num_layers} layers; ask for 1..{num_layers - 1} layers."
        )
    return count


def cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(x_t, y_t): x, y (B,T,D) -> scalar."""
    return (1 - F.cosine_similarity(x.float(), y.float(), dim=-1)).mean()


def block_influence(model: nn.Module, blocks: torch.Tensor, part: str) -> list[float]:
    """ShortGPT's block influence per layer on calibration ``blocks`` (N,T): 1 - cos between what enters and what
    leaves ``part`` ("block": the decoder block; "attention": the residual stream around the attention sublayer).
    Low influence: the part changes the residual stream little, so removing it should cost little."""
    layers = decoder_layers(model)
    totals = [0.0] * len(layers)
    inputs: dict[int, torch.Tensor] = {}

    def enter(index: int):
        def hook(module, args, kwargs):
            inputs[index] = hidden_input(args, kwargs)  # (B,T,D)
        return hook

    def leave(index: int):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output  # (B,T,D)
            after = out if part == "block" else inputs[index] + out  # attention: residual + its contribution
            totals[index] += cosine_distance(inputs[index], after).item()
        return hook

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter(index), with_kwargs=True))
        target = layer if part == "block" else attention(model, index)
        handles.append(target.register_forward_hook(leave(index), with_kwargs=True))
    run_hooked(model, blocks, handles)
    return [total / len(blocks) for total in totals]


def plan_removal_curve(model: nn.Module, config: RemovalConfig, counts: list[int], make: Callable[[list[int]], Plan],
                       part: str, *, progress: bool = True) -> dict[int, Plan]:
    """Removal plans for several layer counts from one selection: greedy on measured KL (``score="loss"``; the plan
    for N layers is the first N chosen) or the N layers of lowest block influence (``score="influence"``)."""
    top = max(counts)
    num_layers = geometry(model).num_layers
    if config.score == "influence":
        calib = calibration_blocks(model, config.calib_text, config.calib_tokens, config.calib_seq_len)
        scores = block_influence(model, calib, part)
        log.info("block influence (%s): %s", part, [round(s, 4) for s in scores])
        order = sorted(range(num_layers), key=lambda layer: (scores[layer], layer))
        return {n: make(sorted(order[:n])) for n in counts}
    probe = Probe.of(model, config, progress)

    def score(layers: list[int], screen: bool = False) -> Divergence:
        return probe.measure(make(sorted(layers)), screen=screen)

    steps = greedy_select(score, list(range(num_layers)), top, shortlist=config.shortlist, width=config.greedy_width,
                          screen=probe.screener(score), progress=progress, desc=f"{make([]).method} greedy selection")
    for n in counts:
        log.info("%s (KL %.4f, held-out ppl %.3f)", make(sorted(steps[n - 1].chosen)).summary(),
                 steps[n - 1].score.kl, steps[n - 1].score.ppl)
    log.info("%s planning measured %d plans", make([]).method, probe.measured)
    return {n: make(sorted(steps[n - 1].chosen)) for n in counts}
