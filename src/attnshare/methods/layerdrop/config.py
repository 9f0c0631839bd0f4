"""Planning knobs for layerdrop (whole decoder blocks removed)."""

from __future__ import annotations

from dataclasses import dataclass

from ..drop.config import RemovalConfig


@dataclass
class LayerDropConfig(RemovalConfig):
    """Which decoder blocks are removed (attention, MLP and norms; their cache slot stores nothing).

    Budget: ``--budget N`` blocks, ``--kv-saving F`` (each block saves 1/L of the KV cache) or ``--param-saving F``
    (each saves a whole block's parameters).
    """
