"""A fitted start for LiSA layers, in closed form from calibration data (``--init fit``), instead of aligned sharing.

Notation: B batch, T queries, S keys, H query heads, Hkv kv heads, d head dim, D hidden size, F rotary frequency
pairs (d/2 when all of the head rotates), r = 2 x (kept frequencies) the low-rank width.

A layer's own scores are a sum over rotary frequency pairs, ``S_h = sum_f share_{h,f}`` with ``share_{h,f} = scaling
q_f . k_f`` (each pair rotates on its own), and the low-rank term can hold r/2 of those shares exactly: its q/k rows
are the layer's own q/k rows of those frequencies, rotated with the same angles (``gains`` scale each head's q rows).
So each head's start is the linear fit ``S_h ~ sum_i W[h,i] Z_i + sum_f g[h,f] share_{h,f}`` over the donor's H heads Z
and the kept frequencies. Softmax ignores a constant per row, and ``KL(P || softmax(S + e)) ~ 1/2 Var_P(e)`` per row,
so the fit is a least-squares one weighted by the layer's own attention P, both sides centred under P (ridge
towards the head permutation for W). The r/2 frequencies are chosen greedily, for all heads of a layer together, by
that residual. Layers are fitted in order, each on the scores its donor will really give.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ...analysis.collect import calibration_blocks
from ...arch import NORM_NAMES, ArchSpec, Geometry, arch_of, attention, geometry
from ...attention.functional import repeat_kv
from ...progress import progress_bar
from .kernels import fill_masked
from .modules import mix_heads, permutation_matrix
from .plan import LayerFit
from .training import recording

log = logging.getLogger(__name__)

RIDGE = 1e-3  # ridge of the mixing fit, relative to the mean diagonal of its normal matrix
DIGITS = 7  # significant digits the plan keeps of fitted numbers (the plan in memory equals its JSON)


def rounded(values: list[float]) -> list[float]:
    return [float(f"{v:.{DIGITS}g}") for v in values]


# ------------------------------------------------------------------------------------------------ pure math


def pair_dims(frequencies: list[int], half: int) -> torch.Tensor:
    """Head dims of frequency pairs in rotate-half layout: [f..., f + half...] -> (r,)."""
    return torch.tensor(list(frequencies) + [f + half for f in frequencies], dtype=torch.long)


def centred(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """x (n,T,S) minus its P-weighted mean over each row; p (T,S) sums to 1 per row (0 where masked)."""
    mean = torch.einsum("nts,ts->nt", x, p)  # (n,T): one batched product, no x * p copy
    return x - mean.unsqueeze(-1)


def weighted_rows(x: torch.Tensor, p: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """x (n,T,S) centred under p (T,S) and scaled by ``root`` = sqrt(p) flattened (T*S,): (n, T*S), so that
    ``y @ y.T`` is the P-weighted covariance sum of x's rows."""
    return centred(x.float(), p).reshape(x.shape[0], -1).mul_(root)


def frequency_shares(q: torch.Tensor, k: torch.Tensor, scaling: float, half: int) -> torch.Tensor:
    """Each rotary frequency pair's share of each head's scores: q (1,H,T,d), k (1,Hkv,S,d) post-RoPE ->
    (H,F,T,S) float32 (F = ``half`` pairs; their sum over F is the scores of the rotated dims)."""
    k = repeat_kv(k, q.shape[1] // k.shape[1])[0].float()  # (H,S,d)
    q = q[0].float()  # (H,T,d)
    first = torch.einsum("htf,hsf->hfts", q[..., :half], k[..., :half])  # (H,F,T,S)
    return first.add_(torch.einsum("htf,hsf->hfts", q[..., half : 2 * half], k[..., half : 2 * half])).mul_(scaling)


class HeadFit:
    """Normal equations of each head's P-weighted, centred least-squares fit of its scores
    ``target_h ~ sum_i W[h,i] z_i + sum_f g[h,f] share_{h,f}`` over the donor's H heads and the layer's F
    frequency shares, from which frequencies are chosen (greedily, for all heads of the layer together)."""

    def __init__(self, heads: int, pairs: int) -> None:
        self.heads, self.pairs = heads, pairs
        n = heads + pairs
        self.gram = torch.zeros(heads, n, n, dtype=torch.float64)  # (H, H+F, H+F)
        self.cross = torch.zeros(heads, n, dtype=torch.float64)  # (H, H+F)
        self.total = torch.zeros(heads, dtype=torch.float64)  # (H,) P-weighted variance of the target

    def add(self, z: torch.Tensor, shares: torch.Tensor, target: torch.Tensor, probs: torch.Tensor) -> None:
        """z (1,H,T,S) finite donor scores, shares (H,F,T,S), target (1,H,T,S) finite, probs (1,H,T,S).

        Each block of the normal matrix is one product of centred rows scaled by sqrt(P) (no concatenated copy)."""
        h = self.heads
        for out in range(h):
            p = probs[0, out].float()  # (T,S), 0 where masked
            root = p.sqrt().reshape(-1)  # (T*S,)
            yz = weighted_rows(z[0], p, root)  # (H, T*S)
            ys = weighted_rows(shares[out], p, root)  # (F, T*S)
            yt = weighted_rows(target[0, out : out + 1], p, root)[0]  # (T*S,)
            zs = (yz @ ys.T).double()  # (H,F)
            gram = self.gram[out]
            gram[:h, :h] += (yz @ yz.T).double()
            gram[:h, h:] += zs
            gram[h:, :h] += zs.T
            gram[h:, h:] += (ys @ ys.T).double()
            self.cross[out] += torch.cat([yz @ yt, ys @ yt]).double()
            self.total[out] += (yt @ yt).double()

    def solve(self, kept: list[int], prior: torch.Tensor, ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixing (H,H) (ridge towards ``prior``'s rows) and gains (H, len(kept)) of the ``kept`` frequencies."""
        cols = list(range(self.heads)) + [self.heads + f for f in kept]
        pull = torch.zeros(self.heads, len(cols), dtype=torch.float64)
        pull[:, : self.heads] = prior.double()
        gram = self.gram[:, cols][:, :, cols]  # (H,C,C)
        lam = ridge * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)  # (H,)
        eye = torch.eye(len(cols), dtype=torch.float64)
        rhs = self.cross[:, cols] + lam[:, None] * pull  # (H,C)
        coef = torch.linalg.solve(gram + lam[:, None, None] * eye, rhs.unsqueeze(-1)).squeeze(-1)  # (H,C)
        coef = coef.float()  # (H, H+kept)
        return coef[:, : self.heads], coef[:, self.heads :]

    def residual(self, kept: list[int], prior: torch.Tensor, ridge: float = RIDGE) -> float:
        """Sum over heads of the P-weighted residual variance with ``kept`` frequencies (the fit's objective)."""
        mixing, gains = self.solve(kept, prior, ridge)
        cols = list(range(self.heads)) + [self.heads + f for f in kept]
        coef = torch.cat([mixing, gains], dim=1).double()  # (H, C)
        explained = 2 * (coef * self.cross[:, cols]).sum(-1)
        quadratic = torch.einsum("hi,hij,hj->h", coef, self.gram[:, cols][:, :, cols], coef)
        return (self.total - explained + quadratic).sum().item()

    def select(self, count: int, prior: torch.Tensor, ridge: float = RIDGE) -> list[int]:
        """``count`` frequencies chosen greedily, each the one that lowers the summed residual most."""
        kept: list[int] = []
        for _ in range(count):
            rest = [f for f in range(self.pairs) if f not in kept]
            kept.append(min(rest, key=lambda f: self.residual(kept + [f], prior, ridge)))
        return sorted(kept)


def low_rank_weights(w_q: torch.Tensor, w_k: torch.Tensor, dims: torch.Tensor, heads: int, kv_heads: int,
                     scaling: float, q_scale: torch.Tensor, k_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lisa_q (H*r, D) and lisa_k (Hkv*r, D) from the base rows of head dims ``dims`` (r,), so that
    ``q_lr k_lr^T / sqrt(r)`` equals ``scaling x`` those dims' share of the scores, each dim's q rows times
    ``q_scale``.

    w_q (H*d, D), w_k (Hkv*d, D); q_scale (H,r) and k_scale (Hkv,r) per kept dim (gains, q/k norms)."""
    r = dims.numel()
    c = math.sqrt(scaling * math.sqrt(r))  # split over q and k
    d = w_q.shape[0] // heads
    q = w_q.view(heads, d, -1)[:, dims] * (c * q_scale).unsqueeze(-1)  # (H,r,D)
    k = w_k.view(kv_heads, d, -1)[:, dims] * (c * k_scale).unsqueeze(-1)  # (Hkv,r,D)
    return q.reshape(heads * r, -1), k.reshape(kv_heads * r, -1)


def norm_scale(norm: nn.Module | None, heads: int, head_dim: int, inverse_rms: list[float], ref: torch.Tensor) -> torch.Tensor:
    """(heads, d) factors a q/k norm applies to each dim: its weight (read as ``norm(ones)``, whatever form the
    family's RMSNorm takes) times each head's mean inverse RMS; ones without a norm."""
    if norm is None:
        return torch.ones(heads, head_dim, dtype=ref.dtype, device=ref.device)
    width = norm.weight.numel()
    with torch.no_grad():
        weight = norm(torch.ones(1, width, dtype=ref.dtype, device=ref.device)).reshape(-1)  # (d,) or (heads*d,)
    weight = weight.expand(heads, head_dim) if width == head_dim else weight.view(heads, head_dim)
    return weight * torch.tensor(inverse_rms, dtype=ref.dtype, device=ref.device).unsqueeze(-1)


def inverse_rms(x: torch.Tensor, weight: torch.Tensor, heads: int, per_head: bool) -> torch.Tensor:
    """Sum over tokens of 1/rms of the pre-norm projection ``x W^T`` per head: x (N,D), weight (heads*d, D) -> (heads,).

    ``per_head``: the norm runs over each head's d dims (else over the whole projection, one value repeated)."""
    proj = (x.float() @ weight.float().T).view(x.shape[0], heads, -1)  # (N,heads,d)
    ms = proj.pow(2).mean(-1) if per_head else proj.pow(2).mean((-1, -2)).unsqueeze(-1).expand(-1, heads)
    return ms.add(1e-6).rsqrt().sum(0)


def fitted_start(base: nn.Module, spec: ArchSpec, geo: Geometry, fit: LayerFit
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (mixing (H,H), lisa_q (H*r, D), lisa_k (Hkv*r, D)) weights of a fitted start, from the base attention
    module ``base`` (read before its q/k leave) and the plan's ``fit``."""
    w_q, w_k = getattr(base, spec.q).weight.detach(), getattr(base, spec.k).weight.detach()
    q_norm, k_norm = (getattr(base, name) for name in NORM_NAMES) if spec.qk_norm else (None, None)
    h, hkv, d = geo.num_heads, geo.num_kv_heads, geo.head_dim
    dims = pair_dims(fit.frequencies, fit.pairs)  # (r,)
    gains = torch.tensor(fit.gains, dtype=w_q.dtype, device=w_q.device).repeat(1, 2)  # (H,r): both dims of a pair
    q_scale = norm_scale(q_norm, h, d, fit.q_scale or [1.0] * h, w_q)[:, dims] * gains  # (H,r)
    k_scale = norm_scale(k_norm, hkv, d, fit.k_scale or [1.0] * hkv, w_k)[:, dims]  # (Hkv,r)
    q, k = low_rank_weights(w_q, w_k, dims, h, hkv, fit.scaling, q_scale, k_scale)
    return torch.tensor(fit.mixing, dtype=w_q.dtype, device=w_q.device), q, k


def rotary_half(kwargs: dict, head_dim: int) -> int:
    """Frequency pairs F of an attention call's rotary tables (B,T,2F); d/2 without them."""
    tables = kwargs.get("position_embeddings")
    return head_dim // 2 if tables is None else tables[0].shape[-1] // 2


@dataclass
class Recorded:
    """What one calibration block showed of one layer (teacher): its attention and, for LiSA layers, its q/k."""

    scores: torch.Tensor  # (1,H,T,S) float32, masked entries 0 (fill_masked)
    probs: torch.Tensor | None = None  # (1,H,T,S)
    q: torch.Tensor | None = None  # (1,H,T,d) post-RoPE
    k: torch.Tensor | None = None  # (1,Hkv,S,d) post-RoPE


def fit_layers(model: nn.Module, layers: list[int], head_map: dict[int, list[int]], rank: int, *,
               text: str = "plays", tokens: int = 1024, seq_len: int = 512, ridge: float = RIDGE,
               progress: bool = True) -> dict[int, LayerFit]:
    """The fitted start of each LiSA layer in ``layers`` (donor l-1) on the base ``model``, from ``tokens``
    calibration tokens: kept frequencies, head mixing and gains (see the module's docstring), and for q/k-norm
    families each head's mean 1/rms of its pre-norm q and k.

    Layers are fitted in order, each on the scores its donor will really give: the teacher's for a standard
    donor, the fitted start's for a LiSA donor (a chain of teacher-forced fits would compound their errors)."""
    spec, geo = arch_of(model), geometry(model)
    need = sorted(set(layers) | {layer - 1 for layer in layers})
    blocks = calibration_blocks(model, text, tokens, seq_len)  # (N,T)
    device = next(model.parameters()).device
    h, hkv = geo.num_heads, geo.num_kv_heads
    recorded: dict[int, list[Recorded]] = {layer: [] for layer in need}
    rms = {layer: (torch.zeros(h), torch.zeros(hkv)) for layer in layers}
    scaling: dict[int, float] = {}
    pairs: dict[int, int] = {}
    for block in progress_bar(blocks, desc="LiSA fit: record", unit="block", show=progress):
        with torch.no_grad(), recording(model, need) as (maps, inputs):
            model.get_decoder()(input_ids=block.unsqueeze(0).to(device), use_cache=False)
        for layer in need:
            state = maps[layer]
            if layer not in layers:
                recorded[layer].append(Recorded(fill_masked(state.scores)))
                continue
            recorded[layer].append(Recorded(fill_masked(state.scores), state.probs, state.q, state.k))
            scaling[layer], pairs[layer] = float(state.scaling), rotary_half(inputs[layer], geo.head_dim)
            if spec.qk_norm:
                module, per_head = attention(model, layer), spec.qk_norm_scope == "head"
                x = inputs[layer]["hidden_states"].reshape(-1, geo.hidden_size)  # (T,D)
                rms[layer][0].add_(inverse_rms(x, getattr(module, spec.q).weight, h, per_head))
                rms[layer][1].add_(inverse_rms(x, getattr(module, spec.k).weight, hkv, per_head))
    count = blocks.numel()
    out: dict[int, LayerFit] = {}
    student: dict[int, list[torch.Tensor]] = {}  # fitted scores of LiSA layers a later LiSA layer reads
    for layer in progress_bar(sorted(layers), desc="LiSA fit: layers", unit="layer", show=progress):
        donors = student.pop(layer - 1, None) or [r.scores for r in recorded[layer - 1]]
        fit = HeadFit(h, pairs[layer])
        for z, r in zip(donors, recorded[layer], strict=True):
            fit.add(z, frequency_shares(r.q, r.k, scaling[layer], pairs[layer]), r.scores, r.probs)
        prior = permutation_matrix(head_map.get(layer, list(range(h))))
        kept = fit.select(rank // 2, prior, ridge)
        mixing, gains = (torch.tensor([rounded(row) for row in x.tolist()]) for x in fit.solve(kept, prior, ridge))
        if layer + 1 in layers:
            student[layer] = [mix_heads(z, mixing) + torch.einsum(
                "hf,hfts->hts", gains, frequency_shares(r.q, r.k, scaling[layer], pairs[layer])[:, kept]).unsqueeze(0)
                for z, r in zip(donors, recorded[layer], strict=True)]
        scales = [rounded((v / count).tolist()) for v in rms[layer]] if spec.qk_norm else [[], []]
        out[layer] = LayerFit(kept, mixing.tolist(), gains.tolist(), scaling[layer], pairs[layer], *scales)
        log.info("LiSA fit layer %d: frequencies %s, residual %.4g of %.4g", layer, kept,
                 fit.residual(kept, prior, ridge), fit.total.sum().item())
    return out
