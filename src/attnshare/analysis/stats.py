"""Streaming attention statistics: fixed-size accumulators fed one layer's probabilities at a time.

Within one batch, each layer's maps (first ``skip`` query rows dropped) are kept only until the batch ends, so
memory is one batch's maps plus accumulators whose sizes do not depend on the number of batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..arch import decoder_stack, geometry
from ..errors import AttnshareError
from . import metrics
from .collect import record_attention
from .metrics import LN2, causal_pack, flat_cosine, neg_entropy, packed_js_sum

Pair = tuple[int, int]  # (earlier layer, later layer)


@dataclass
class AttentionStats:
    """Sums over calibration batches; read the means with :meth:`layer_js`, :meth:`head_js`, ...

    ``layer_pairs``: compute layer-level similarity for every pair (True) or only for ``head_pairs``.
    ``head_pairs``: (earlier, later) layer pairs whose H x H head similarity is accumulated.
    """

    num_layers: int
    num_heads: int
    skip: int = 16
    head_pairs: list[Pair] = field(default_factory=list)
    layer_pairs: bool = True
    layer_js_sum: torch.Tensor = field(init=False)  # (L, L) Σ over rows of 1 - JS/ln2, same head index
    layer_cos_sum: torch.Tensor = field(init=False)  # (L, L) Σ over (sample, head) of flattened-map cosine
    mean_map_js_sum: torch.Tensor = field(init=False)  # (L, L) Σ over rows of 1 - JS/ln2 of head-averaged maps
    head_js_sum: dict[Pair, torch.Tensor] = field(init=False)  # (H, H) [later head, earlier head]
    head_cos_sum: dict[Pair, torch.Tensor] = field(init=False)
    rows: int = 0  # (sample, row) count per head (JS means divide by rows, layer means by rows * H)
    maps: int = 0  # sample count (cosine means divide by maps, layer means by maps * H)
    _batch: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = self.num_layers
        self.layer_js_sum = torch.zeros(n, n, dtype=torch.float64)
        self.layer_cos_sum = torch.zeros(n, n, dtype=torch.float64)
        self.mean_map_js_sum = torch.zeros(n, n, dtype=torch.float64)
        self.head_pairs = sorted({(min(a, b), max(a, b)) for a, b in self.head_pairs})
        h = self.num_heads
        self.head_js_sum = {p: torch.zeros(h, h, dtype=torch.float64) for p in self.head_pairs}
        self.head_cos_sum = {p: torch.zeros(h, h, dtype=torch.float64) for p in self.head_pairs}
        self._partners = {}  # later layer -> earlier layers it is compared with
        for a, b in self.head_pairs:
            self._partners.setdefault(b, set()).add(a)
        self._needed = {a for a, _ in self.head_pairs} | {b for _, b in self.head_pairs}
        self._batch = {}

    def add(self, layer: int, probs: torch.Tensor) -> None:
        """Feed one layer's probabilities (B,H,T,T) of the current batch; layers arrive in increasing order."""
        if not self.layer_pairs and layer not in self._needed:
            return
        b, h, t, _ = probs.shape
        p = causal_pack(probs.float(), self.skip)  # (B,H,K) rows >= skip, keys <= row
        negent = neg_entropy(p)  # (B,H) Σ over rows of Σ p log p
        mean_map = p.mean(1, keepdim=True)  # (B,1,K) head-averaged map
        mean_negent = neg_entropy(mean_map)  # (B,1)
        if not self._batch:  # first layer of a new batch
            self._count(b, t - self.skip)
        rows = b * (t - self.skip)  # per head
        earlier = sorted(self._batch) if self.layer_pairs else sorted(self._partners.get(layer, ()))
        with torch.no_grad():
            for i in earlier:
                q, q_negent, q_mean, q_mean_negent = self._batch[i]
                sim = rows * h - packed_js_sum(p, q, negent, q_negent).sum().item() / LN2
                mean_sim = rows - packed_js_sum(mean_map, q_mean, mean_negent, q_mean_negent).sum().item() / LN2
                self.mean_map_js_sum[layer, i] += mean_sim
                self.mean_map_js_sum[i, layer] += mean_sim
                cos = flat_cosine(p, q).sum().item()  # over (B,H)
                self.layer_js_sum[layer, i] += sim
                self.layer_js_sum[i, layer] += sim
                self.layer_cos_sum[layer, i] += cos
                self.layer_cos_sum[i, layer] += cos
                if (i, layer) in self.head_js_sum:
                    js = torch.stack([packed_js_sum(p[:, g : g + 1], q, negent[:, g : g + 1], q_negent).sum(0)
                                      for g in range(h)])  # (H, H') [later head, earlier head]
                    self.head_js_sum[(i, layer)] += rows - js.double().cpu() / LN2
                    self.head_cos_sum[(i, layer)] += metrics.head_cosine(p[:, :, None], q[:, :, None]).double().cpu()
        self._batch[layer] = (p, negent, mean_map, mean_negent)

    def _count(self, b: int, n: int) -> None:
        self.rows += b * n
        self.maps += b
        for layer in range(self.num_layers):  # self-similarity is 1 by definition
            self.layer_js_sum[layer, layer] += b * n * self.num_heads
            self.layer_cos_sum[layer, layer] += b * self.num_heads
            self.mean_map_js_sum[layer, layer] += b * n

    def end_batch(self) -> None:
        """Free the current batch's maps."""
        self._batch.clear()

    # means ------------------------------------------------------------------------------------------------------
    def layer_js(self) -> torch.Tensor:
        """(L, L) mean over rows and heads of 1 - JS/ln2, head h compared with head h."""
        return self.layer_js_sum / max(self.rows * self.num_heads, 1)

    def mean_map_js(self) -> torch.Tensor:
        """(L, L) mean over rows of 1 - JS/ln2 between head-averaged maps (a coarser, higher measure)."""
        return self.mean_map_js_sum / max(self.rows, 1)

    def layer_cosine(self) -> torch.Tensor:
        """(L, L) mean over samples and heads of the cosine of flattened maps."""
        return self.layer_cos_sum / max(self.maps * self.num_heads, 1)

    def head_js(self, pair: Pair) -> torch.Tensor:
        """(H, H) mean 1 - JS/ln2 between [later head, earlier head] of ``pair`` = (earlier, later)."""
        return self.head_js_sum[pair] / max(self.rows, 1)

    def head_cosine(self, pair: Pair) -> torch.Tensor:
        return self.head_cos_sum[pair] / max(self.maps, 1)

    def nbytes(self) -> int:
        """Bytes held by the accumulators (excluding the current batch's maps)."""
        tensors = [self.layer_js_sum, self.layer_cos_sum, self.mean_map_js_sum, *self.head_js_sum.values(),
                   *self.head_cos_sum.values()]
        return sum(t.numel() * t.element_size() for t in tensors)



def collect_stats(model, blocks: torch.Tensor, *, head_pairs: list[Pair] = (), layer_pairs: bool = True,
                  skip: int = 16, batch_size: int = 1, progress: bool = False) -> AttentionStats:
    """Stream calibration ``blocks`` (N, T) through ``model`` one batch at a time and accumulate the statistics."""
    from ..progress import progress_bar

    geo = geometry(model)
    if not 0 <= skip < blocks.shape[1] - 1:
        raise AttnshareError(f"Cannot skip {skip} query rows of {blocks.shape[1]}-token blocks; skip fewer rows.")
    for a, b in head_pairs:
        if not (0 <= a < geo.num_layers and 0 <= b < geo.num_layers and a != b):
            raise AttnshareError(f"Layer pair ({a}, {b}) is not two different layers of 0..{geo.num_layers - 1}.")
    stats = AttentionStats(geo.num_layers, geo.num_heads, skip, list(head_pairs), layer_pairs)
    needed = None if layer_pairs else sorted(stats._needed)
    device = next(model.parameters()).device
    batches = range(0, blocks.shape[0], batch_size)
    stack = decoder_stack(model)  # the LM head computes nothing the statistics read
    with record_attention(model, stats.add, needed), torch.inference_mode():
        for start in progress_bar(batches, desc="attention statistics", unit="batch", show=progress, leave=False):
            stack(blocks[start : start + batch_size].to(device), use_cache=False)
            stats.end_batch()
    return stats
