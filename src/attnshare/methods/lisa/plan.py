"""The LiSA plan: which layers use LiSA (each reads layer l-1), head alignment and module shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...arch import Geometry
from ...errors import AttnshareError
from ...plan import Plan, check_layer, int_keys

SOURCES = ("scores", "probs")
INITS = ("permutation", "fit")  # how LiSA layers start: aligned sharing, or fitted in closed form (methods/lisa/fit.py)


@dataclass
class LayerFit:
    """A LiSA layer's fitted start (``init="fit"``); apply rebuilds the weights from it and the base q/k rows."""

    frequencies: list[int]  # the r/2 rotary frequency pairs the low-rank q/k keep (and rotate with)
    mixing: list[list[float]]  # (H,H) initial head mixing of the donor's scores
    gains: list[list[float]]  # (H, r/2) fitted weight of each kept frequency's share of each head's scores
    scaling: float  # the layer's attention scaling (its q/k rows are rescaled so q_lr k_lr^T / sqrt(r) matches it)
    pairs: int  # rotary frequency pairs F of the layer's heads (the rotary tables are 2F wide)
    q_scale: list[float] = field(default_factory=list)  # q-norm models: per query head, mean 1/rms of its pre-norm q
    k_scale: list[float] = field(default_factory=list)  # q-norm models: per kv head, the same for k

    def to_dict(self) -> dict[str, Any]:
        return {"frequencies": self.frequencies, "mixing": self.mixing, "gains": self.gains, "scaling": self.scaling, "pairs": self.pairs,
                "q_scale": self.q_scale, "k_scale": self.k_scale}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerFit:
        return cls([int(f) for f in data["frequencies"]], [[float(x) for x in row] for row in data["mixing"]],
                   [[float(x) for x in row] for row in data["gains"]], float(data["scaling"]), int(data["pairs"]), [float(x) for x in data.get("q_scale", [])],
                   [float(x) for x in data.get("k_scale", [])])

    def check(self, layer: int, geo: Geometry, rank: int) -> None:
        h = geo.num_heads
        if (not 1 <= self.pairs <= geo.head_dim // 2 or len(self.frequencies) != rank // 2
                or not all(0 <= f < self.pairs for f in self.frequencies)):
            raise AttnshareError(f"The fitted start of layer {layer} must keep {rank // 2} of at most "
                                 f"{geo.head_dim // 2} rotary frequencies; make the plan again.")
        if len(self.mixing) != h or any(len(row) != h for row in self.mixing):
            raise AttnshareError(f"The fitted head mixing of layer {layer} must be {h} x {h}; make the plan again.")
        if len(self.gains) != h or any(len(row) != rank // 2 for row in self.gains):
            raise AttnshareError(f"The fitted gains of layer {layer} must be {h} x {rank // 2}; make the plan again.")
        if (self.q_scale or self.k_scale) and (len(self.q_scale) != h or len(self.k_scale) != geo.num_kv_heads):
            raise AttnshareError(f"The fitted q/k scales of layer {layer} must list {h} and {geo.num_kv_heads} "
                                 "values; make the plan again.")


@dataclass
class LiSAPlan(Plan):
    method = "lisa"

    layers: list[int] = field(default_factory=list)  # LiSA layers; layer l's donor is layer l-1
    head_map: dict[int, list[int]] = field(default_factory=dict)  # layer -> donor head each head starts from
    rank: int = 10  # per-head width r of the low-rank Q/K correction
    ffn_width: int = 2  # hidden width of the alignment FFN, as a multiple of H (0: linear head mixing only)
    source: str = "scores"  # Z: the donor's masked pre-softmax scores, or its probabilities (combined in log space)
    rope: bool = True  # rotary position embedding on the low-rank q/k
    local_steps: int = 0  # training recipe: steps of the layer-local first stage before end-to-end distillation
    local_repeats: int = 4  # training recipe: optimizer steps per recorded teacher batch in the layer-local stage
    fused_prefill: bool = True  # gradient-free prefill: donors run SDPA, LiSA layers go in query blocks
    init: str = "permutation"  # how the layers start: aligned sharing, or the closed-form fit in ``fits``
    fits: dict[int, LayerFit] = field(default_factory=dict)  # layer -> its fitted start (init "fit")

    def validate(self, geo: Geometry) -> None:
        for layer in self.layers:
            check_layer(layer, geo, "LiSA")
            if layer == 0:
                raise AttnshareError("Layer 0 has no previous layer to share from; leave it out of the LiSA layers.")
        if len(set(self.layers)) != len(self.layers):
            raise AttnshareError("The LiSA plan lists a layer twice; list each layer once.")
        for layer, heads in self.head_map.items():
            if layer not in self.layers:
                raise AttnshareError(f"The head map names layer {layer}, which is not a LiSA layer in this plan.")
            if len(heads) != geo.num_heads or not all(0 <= h < geo.num_heads for h in heads):
                raise AttnshareError(
                    f"The head map of layer {layer} must list {geo.num_heads} donor heads in 0..{geo.num_heads - 1}."
                )
        if not 1 <= self.rank <= geo.head_dim:
            raise AttnshareError(f"The LiSA rank must be between 1 and the head dim {geo.head_dim}, got {self.rank}.")
        if self.rope and self.rank % 2:
            raise AttnshareError(f"RoPE on the low-rank term needs an even rank, got {self.rank}; use {self.rank + 1}.")
        if self.ffn_width < 0:
            raise AttnshareError(f"The alignment FFN width must be 0 or a positive multiple of H, got {self.ffn_width}.")
        if self.local_steps < 0 or self.local_repeats < 1:
            raise AttnshareError("The layer-local steps must be zero or positive and its repeats at least 1.")
        if self.source not in SOURCES:
            raise AttnshareError(f"The LiSA source must be one of {', '.join(SOURCES)}, got '{self.source}'.")
        self.check_init(geo)

    def check_init(self, geo: Geometry) -> None:
        if self.init not in INITS:
            raise AttnshareError(f"The LiSA init must be one of {', '.join(INITS)}, got '{self.init}'.")
        if self.init == "permutation":
            if self.fits:
                raise AttnshareError("The LiSA plan holds fitted starts but its init is 'permutation'; set it to 'fit'.")
            return
        if self.source != "scores" or not self.rope:
            raise AttnshareError("A fitted LiSA start reproduces the layer's rotated scores; it needs --source scores "
                                 "and RoPE on the low-rank term.")
        if sorted(self.fits) != sorted(self.layers):
            raise AttnshareError("A fitted LiSA plan needs a fitted start for every LiSA layer and no other; make the "
                                 "plan again.")
        for layer, fit in self.fits.items():
            fit.check(layer, geo, self.rank)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "layers": sorted(self.layers),
            "head_map": {str(r): h for r, h in sorted(self.head_map.items())},
            "rank": self.rank,
            "ffn_width": self.ffn_width,
            "source": self.source,
            "rope": self.rope,
            "local_steps": self.local_steps,
            "local_repeats": self.local_repeats,
            "fused_prefill": self.fused_prefill,
            **({"init": self.init, "fits": {str(l): f.to_dict() for l, f in sorted(self.fits.items())}}
               if self.init != "permutation" else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LiSAPlan:
        return cls(
            layers=sorted(int(x) for x in data.get("layers", [])),
            head_map={r: [int(h) for h in hs] for r, hs in int_keys(data.get("head_map", {})).items()},
            rank=int(data.get("rank", 10)),
            ffn_width=int(data.get("ffn_width", 2)),
            source=str(data.get("source", "scores")),
            rope=bool(data.get("rope", True)),
            local_steps=int(data.get("local_steps", 0)),
            local_repeats=int(data.get("local_repeats", 4)),
            fused_prefill=bool(data.get("fused_prefill", True)),
            init=str(data.get("init", "permutation")),
            fits={layer: LayerFit.from_dict(f) for layer, f in int_keys(data.get("fits", {})).items()},
        )

    def summary(self) -> str:
        return (f"lisa: {len(self.layers)} layers ({', '.join(map(str, sorted(self.layers)))}), rank {self.rank}, "
                f"ffn x{self.ffn_width}, {self.source}{', rope' if self.rope else ''}"
                f"{', aligned' if self.head_map else ''}{', fitted start' if self.init == 'fit' else ''}")
