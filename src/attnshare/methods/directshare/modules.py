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
    """Unique unit slices, one parameter per projection kind: q/k/v (N, r, D), o (D, N, r), biases (N, r); and the
    q/k norms that travel with them (``norms``, e.g. ``q_norm_4``: layer 4's q_norm, which other layers run too).

    o keeps the bank axis in the middle so a run of consecutive units is a (D, n*r) view for ``F.linear``."""

    def __init__(self, weights: dict[str, torch.Tensor], biases: dict[str, torch.Tensor],
                 norms: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        for kind, w in weights.items():
            self.register_parameter(kind, nn.Parameter(w))
        for kind, b in biases.items():
            self.register_parameter(f"{kind}_bias", nn.Parameter(b))
        self.norms = nn.ModuleDict(norms or {})

    def kinds(self) -> list[str]:
        """The projection kinds the bank holds slices of (q, k, v, o)."""
        return [name for name, _ in self.named_parameters(recurse=False) if not name.endswith("_bias")]

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={tuple(p.shape)}" for n, p in self.named_parameters(recurse=False))


class SharedNorm(nn.Module):
    """A layer's q_norm/k_norm that is stored once in a :class:`UnitBank` and run by the layer it came from and by
    the layers that borrow it (the model's own norm module, moved; nothing of its forward is rewritten). The bank is
    referenced, not registered, so the weight is counted and saved once."""

    def __init__(self, bank: UnitBank, key: str) -> None:
        super().__init__()
        self._bank = (bank,)
        self.key = key

    @property
    def bank(self) -> UnitBank:
        return self._bank[0]

    @property
    def norm(self) -> nn.Module:
        return self.bank.norms[self.key]

    @property
    def weight(self) -> torch.Tensor:
        return self.norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def extra_repr(self) -> str:
        return f"bank norm {self.key}"


def runs_of(index: list[int]) -> list[tuple[int, int]]:
    """Split bank rows into maximal runs of consecutive rows: [5, 6, 2] -> [(5, 2), (2, 1)] as (start, length)."""
    runs: list[tuple[int, int]] = []
    for row in index:
        if runs and runs[-1][0] + runs[-1][1] == row:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((row, 1))
    return runs


def gathered_linear(x: torch.Tensor, bank: torch.Tensor, bias: torch.Tensor | None, runs: list[tuple[int, int]],
                    by_rows: bool, own_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with a weight assembled from bank runs, reading the bank in place (views, no weight copy).

    by_rows (q/k/v): bank (N, r, D), bias (N, r); each run is a (n*r, D) view and the outputs are concatenated.
    o (columns): bank (D, N, r); each run multiplies its slice of x's (U*r) features and the results are summed.
    """
    if by_rows:
        outs = []
        for start, n in runs:
            w = bank.narrow(0, start, n).reshape(-1, bank.shape[-1])  # (n*r, D) view
            b = bias.narrow(0, start, n).reshape(-1) if bias is not None else None  # (n*r,)
            outs.append(F.linear(x, w, b))  # (..., n*r)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # (..., U*r)
    r = bank.shape[-1]
    if len(runs) == 1:
        out = F.linear(x, bank.narrow(1, runs[0][0], runs[0][1]).reshape(bank.shape[0], -1))  # (D, U*r) view
    else:
        out, col = None, 0
        for start, n in runs:
            w = bank.narrow(1, start, n).reshape(bank.shape[0], n * r)  # (D, n*r) view
            part = F.linear(x.narrow(-1, col, n * r), w)  # (..., D)
            out = part if out is None else out + part
            col += n * r
    return out if own_bias is None else out + own_bias


def compact(bank: UnitBank, users: list[GatheredLinear], norm_users: list[SharedNorm]) -> None:
    """Drop the bank rows no projection in ``users`` reads any more (a later plan removed the projections, e.g. SA
    receivers' q/k) and renumber the users' indices, and the norms no module in ``norm_users`` runs; the dropped
    rows' and norms' memory is freed."""
    for key in set(bank.norms) - {n.key for n in norm_users}:
        del bank.norms[key]
    for kind in bank.kinds():
        readers = [u for u in users if u.kind == kind]
        used = sorted({row for u in readers for row in u.index})
        param = getattr(bank, kind)
        axis = 0 if kind in ROW_KINDS else 1  # q/k/v (N, r, D); o (D, N, r)
        if len(used) == param.shape[axis]:
            continue
        keep = torch.tensor(used, dtype=torch.long, device=param.device)
        names = [kind] + ([f"{kind}_bias"] if hasattr(bank, f"{kind}_bias") else [])
        for name, dim in zip(names, (axis, 0)):
            old = getattr(bank, name)
            setattr(bank, name, nn.Parameter(old.detach().index_select(dim, keep), requires_grad=old.requires_grad))
        renumber = {row: i for i, row in enumerate(used)}
        for u in readers:
            u.index = [renumber[row] for row in u.index]
            u.runs = runs_of(u.index)


class GatheredLinear(nn.Module):
    """A q/k/v/o projection whose unit slices live in a :class:`UnitBank`; forward runs ``F.linear`` on views of
    the bank, one per run of consecutive bank rows (a layer without replaced units is a single run), so no weight is
    copied. The bank is referenced, not registered, so each shared slice is counted and saved once (in the bank).
    o_proj's bias (one per layer, not per unit) stays here as ``bias``."""

    def __init__(self, bank: UnitBank, kind: str, index: list[int], in_features: int, out_features: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self._bank = (bank,)  # a tuple hides the module from registration
        self.kind = kind
        self.in_features, self.out_features = in_features, out_features
        self.index = list(index)  # bank row of each unit
        self.runs = runs_of(self.index)
        self.bias = nn.Parameter(bias) if bias is not None else None

    @property
    def bank(self) -> UnitBank:
        return self._bank[0]

    @property
    def weight(self) -> torch.Tensor:
        """The full projection weight, gathered from the bank (a copy): (out_features, in_features)."""
        w = getattr(self.bank, self.kind)
        if self.kind in ROW_KINDS:
            return torch.cat([w.narrow(0, start, n) for start, n in self.runs]).reshape(-1, w.shape[-1])  # (U*r, D)
        return torch.cat([w.narrow(1, start, n) for start, n in self.runs], dim=1).reshape(w.shape[0], -1)  # (D, U*r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        by_rows = self.kind in ROW_KINDS
        bias = getattr(self.bank, f"{self.kind}_bias", None) if by_rows else None
        return gathered_linear(x, getattr(self.bank, self.kind), bias, self.runs, by_rows, self.bias)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in={self.in_features}, out={self.out_features}, bank_rows={self.index}"
