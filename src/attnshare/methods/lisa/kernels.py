"""The head FFN g_l as one fused kernel for gradient-free prefill blocks.

g_l(z) = W_skip z + W_down gelu(W_up z + b) mixes only the H heads of each (query, key) pair. In eager PyTorch that
is three batched GEMMs whose inner sizes are H and m (9 and 18 on SmolLM2): each reads and writes a whole
(B,·,rows,keys) tensor, so the FFN is bound by memory traffic, not arithmetic (a 512 x 1,024 block: 29 ms, three
times SDPA over the same block). Written as per-channel sums of scalar-weighted tensors, the whole FFN is one
pointwise expression over (query, key) pairs, which inductor turns into one loop that reads z once and writes the
result once (10.5 ms for the same block; docs/results/bench.md, "LiSA prefill").

:func:`head_ffn` picks the path: in an eager gradient-free prefill block on the fast path
(``ShareContext.fused_kernels``, set by bench and generate ``--compile``) the expression compiled once per process
(sizes dynamic, so every block shape shares it; the first call waits 10-20 s for the compiler); elsewhere, and where
compiling fails (no C++ compiler), the eager GEMMs (after one warning). Inside a ``torch.compile``'d model the GEMMs
are traced too: the unrolled expression (some 700 nodes per block) made a 2,048-token LiSA prefill compile for over
12 minutes before it was stopped.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_STATE = {"enabled": True}  # False after compiling failed once in this process


def fill_masked(z: torch.Tensor) -> torch.Tensor:
    """Masked (-inf) donor entries -> 0, so the head FFN sees finite values; the layer's own mask is re-applied.

    Returns a new contiguous tensor even for a strided view (one pass)."""
    return torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)


def unrolled_head_ffn(z: torch.Tensor, skip: torch.Tensor, up: torch.Tensor | None, up_bias: torch.Tensor | None,
                      down: torch.Tensor | None, fill: bool) -> torch.Tensor:
    """g_l(z) as per-channel sums: z (B,H,T,S) float32, skip (H,H), up (m,H), up_bias (m,), down (H,m) (no MLP when
    ``up`` is None) -> (B,H,T,S). ``fill``: masked (-inf) entries of z read as 0 (:func:`fill_masked`)."""
    heads = z.shape[1]
    zs = [z[:, j] for j in range(heads)]  # H x (B,T,S)
    if fill:
        zs = [fill_masked(x) for x in zs]
    hidden = [] if up is None else [
        F.gelu(sum(up[i, j] * zs[j] for j in range(heads)) + up_bias[i]) for i in range(up.shape[0])]  # m x (B,T,S)
    out = [sum(skip[h, j] * zs[j] for j in range(heads)) + sum(down[h, i] * x for i, x in enumerate(hidden))
           for h in range(heads)]
    return torch.stack(out, dim=1)  # (B,H,T,S)


@functools.cache
def _compiled():
    return torch.compile(unrolled_head_ffn, fullgraph=True, dynamic=True)


def head_ffn(z: torch.Tensor, skip: torch.Tensor, up: torch.Tensor | None, up_bias: torch.Tensor | None,
             down: torch.Tensor | None, fill: bool) -> torch.Tensor | None:
    """The fused g_l(z) (see the module doc), or None where the caller's GEMMs should run (inside a compiled model,
    gradients on, or no compiled kernel in this process)."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or not _STATE["enabled"]:
        return None
    try:
        return _compiled()(z, skip, up, up_bias, down, fill)
    except Exception as e:  # noqa: BLE001 -- no C++ compiler, an unsupported platform: the eager path is exact
        _STATE["enabled"] = False
        log.warning("LiSA's fused head-FFN kernel is unavailable here (%s: %s); prefill runs the eager GEMMs.",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
