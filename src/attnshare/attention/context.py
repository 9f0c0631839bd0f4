"""Per-forward store that carries a donor layer's attention to the later layers that reuse it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionBlock:
    """Attention of query rows ``rows`` over the first ``keys`` keys (a causal block never sees later keys)."""

    rows: slice
    keys: int
    scores: torch.Tensor  # (B,H,rows,keys) float32 pre-softmax
    probs: torch.Tensor  # (B,H,rows,keys) post-softmax (zero where masked)
    finite: bool = True  # True: scores unmasked (plain causal, readers mask their own); False: -inf where masked


def assemble(blocks: list[AttentionBlock], name: str, fill: float) -> torch.Tensor:
    """Blocks' ``name`` ("scores"/"probs") as one (B,H,T,S) map, ``fill`` where no block reached."""
    last = blocks[-1]
    ref = getattr(last, name)
    full = ref.new_full((*ref.shape[:2], last.rows.stop, last.keys), fill)  # (B,H,T,S)
    for block in blocks:
        full[..., block.rows, : block.keys] = getattr(block, name)
    return full


@dataclass
class DonorState:
    """What a donor publishes during one forward: its probabilities (and scores), its post-RoPE Q/K (fused
    prefill), or the blocks of a blockwise LiSA prefill."""

    probs: torch.Tensor | None = None  # (B,H,Tq,S) post-softmax
    scores: torch.Tensor | None = None  # (B,H,Tq,S) pre-softmax float32 (consumers apply their own mask)
    blocks: list[AttentionBlock] | None = None  # a blockwise prefill's attention, query rows in order
    q: torch.Tensor | None = None  # (B,H,Tq,d) post-RoPE
    k: torch.Tensor | None = None  # (B,Hkv,S,d) post-RoPE, cache included
    mask: torch.Tensor | None = None
    scaling: float = 1.0
    softcap: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def whole(self) -> DonorState:
        """This state with blockwise attention assembled into whole (B,H,T,S) maps; scores stay unmasked inside
        the causal band (consumers of scores apply their own mask)."""
        if self.blocks is None:
            return self
        return DonorState(probs=assemble(self.blocks, "probs", 0.0), scores=assemble(self.blocks, "scores",
                          float("-inf")), mask=self.mask, scaling=self.scaling, softcap=self.softcap)

    def block_at(self, rows: slice, keys: int) -> AttentionBlock | None:
        """The published block covering exactly ``rows`` x ``keys``, if there is one."""
        for block in self.blocks or ():
            if block.rows == rows and block.keys == keys:
                return block
        return None


class ShareContext:
    """Holds each donor's state until its last consumer of this forward has read it, then frees it.

    Layers run in order within one forward, so a donor always publishes before its consumers read.
    """

    def __init__(self) -> None:
        self.last_consumer: dict[int, int] = {}  # donor layer -> highest layer index that reads it
        self._states: dict[int, DonorState] = {}
        # the fast path (bench/generate --compile): eager prefill blocks may run kernels compiled once per process
        # (LiSA's head FFN); off by default, so a plain forward never waits for a compiler
        self.fused_kernels = False

    def add_edge(self, donor: int, consumer: int) -> None:
        self.last_consumer[donor] = max(consumer, self.last_consumer.get(donor, -1))

    def remove_consumer(self, consumer: int) -> None:
        self.last_consumer = {d: c for d, c in self.last_consumer.items() if c != consumer}

    def publishes(self, layer: int) -> bool:
        return layer in self.last_consumer

    def publish(self, layer: int, state: DonorState) -> None:
        self._states[layer] = state

    def consume(self, donor: int, consumer: int) -> DonorState:
        state = self._states.get(donor)
        if state is None:
            raise RuntimeError(f"layer {consumer} reads layer {donor}'s attention, which this forward never published")
        if self.last_consumer.get(donor) == consumer:
            del self._states[donor]
        return state

    def clear(self) -> None:
        self._states.clear()
