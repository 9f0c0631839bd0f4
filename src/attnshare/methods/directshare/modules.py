"""Stored-once weight sharing: a bank of unique unit slices, and projections that gather their rows from it.

Notation: N bank rows (unique units), U units per layer, r rows per unit (G*d for q and o, d for k and v),
D hidden size. A replaced unit has no weights of its own: its layer's index points at its root's bank row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROW_KINDS = ("q", "k", "v")  # projections split by output rows; "o" is split by input columns


class UnitBank(nn.Module):
    """Unique unit slices, one parameter per projection kind: q/k/v (N, r, D), o (N, D, r), biases (N, r)."""

    def __init__(self, weights: dict[str, torch.Tensor], biases: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for kind, w in weights.items():
            self.register_parameter(kind, nn.Parameter(w))
        for kind, b in biases.items():
            self.register_parameter(f"{kind}_bias", nn.Parameter(b))

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={tuple(p.shape)}" for n, p in self.named_parameters())


def gather_units(bank: torch.Tensor, index: torch.Tensor, start: int | None) -> torch.Tensor:
    """Rows ``index`` of ``bank`` (N, ...) -> (U, ...): a view when they are the contiguous run from ``start``."""
    if start is not None:
        return bank.narrow(0, start, index.numel())  # (U, ...) view, no copy
    return bank.index_select(0, index)  # (U, ...)


class GatheredLinear(nn.Module):
    """A q/k/v/o projection whose unit slices live in a :class:`UnitBank`; forward is ``F.linear`` on the gathered
    weight. The bank is referenced, not registered, so each shared slice is counted and saved once (in the bank).
    o_proj's bias (one per layer, not per unit) stays here as ``bias``."""

    def __init__(self, bank: UnitBank, kind: str, index: list[int], in_features: int, out_features: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self._bank = (bank,)  # a tuple hides the module from registration
        self.kind = kind
        self.in_features, self.out_features = in_features, out_features
        self._index = torch.tensor(index, dtype=torch.long)  # (U,) bank row of each unit; moved lazily per device
        contiguous = index == list(range(index[0], index[0] + len(index)))
        self._start = index[0] if contiguous else None
        self.bias = nn.Parameter(bias) if bias is not None else None

    @property
    def bank(self) -> UnitBank:
        return self._bank[0]

    @property
    def index(self) -> list[int]:
        return self._index.tolist()

    def _index_on(self, device: torch.device) -> torch.Tensor:
        if self._index.device != device:
            self._index = self._index.to(device)
        return self._index

    @property
    def weight(self) -> torch.Tensor:
        """The full projection weight, gathered from the bank: (out_features, in_features)."""
        w = getattr(self.bank, self.kind)
        units = gather_units(w, self._index_on(w.device), self._start)  # (U, r, D) or (U, D, r) for o
        if self.kind in ROW_KINDS:
            return units.reshape(-1, units.shape[-1])  # (U*r, D)
        return units.transpose(0, 1).reshape(units.shape[1], -1)  # (D, U*r)

    def gathered_bias(self) -> torch.Tensor | None:
        if self.kind not in ROW_KINDS:
            return self.bias
        b = getattr(self.bank, f"{self.kind}_bias", None)
        if b is None:
            return None
        return gather_units(b, self._index_on(b.device), self._start).reshape(-1)  # (U*r,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.gathered_bias())

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in={self.in_features}, out={self.out_features}, bank_rows={self.index}"
