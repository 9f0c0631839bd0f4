"""Per-forward store that carries a donor layer's attention to the later layers that reuse it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DonorState:
    """What a donor publishes during one forward: either its probabilities or its post-RoPE Q/K (fused path)."""

    probs: torch.Tensor | None = None  # (B,H,Tq,S) post-softmax
    scores: torch.Tensor | None = None  # (B,H,Tq,S) masked pre-softmax (float32), when a consumer asks for it
    q: torch.Tensor | None = None  # (B,H,Tq,d) post-RoPE
    k: torch.Tensor | None = None  # (B,Hkv,S,d) post-RoPE, cache included
    mask: torch.Tensor | None = None
    scaling: float = 1.0
    softcap: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ShareContext:
    """Holds each donor's state until its last consumer of this forward has read it, then frees it.

    Layers run in order within one forward, so a donor always publishes before its consumers read.
    """

    def __init__(self) -> None:
        self.last_consumer: dict[int, int] = {}  # donor layer -> highest layer index that reads it
        self._states: dict[int, DonorState] = {}

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
