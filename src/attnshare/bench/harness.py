"""Speed and memory of base and shared variants in one process (SPEC §6).

Every variant is built up front; then, after warm-up, repeats run the variants interleaved: each variant prefills
``batch x context`` tokens into a fresh cache (logits for the last token only, as ``generate`` does), then the
variants run ``new_tokens`` greedy decode steps in lockstep, one step of each in turn (the order rotates every
repeat), so load changes on a shared machine hit every variant alike. Ratios are the median over repeats of the variant's speed over the base's speed in the same repeat,
and each sits next to the byte model's ideal ratio (:mod:`.bytemodel`).

``--compile`` runs every variant through ``torch.compile(fullgraph=True)`` with a static cache (one graph for the
prefill shape, one for the decode step; a graph break is an error) and GQA-native SDPA (HF's SDPA would copy the
cache's K/V per query head at every compiled step), after a full-shape warm-up that compiles; the
compile time is reported apart, and the eager base with a dynamic cache is benchmarked beside them as the path the
compiled ones replace.

Max-batch mode turns KV savings into throughput (as the LiSA paper measures): each variant decodes at the largest
batch whose parameters + KV cache fit a memory budget. Its cache is built by one batch-1 prefill, tiled over the
batch (decode speed does not depend on the cached values), so huge batches stay affordable on a CPU.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..api import apply, load, read_artifact
from ..errors import AttnshareError
from ..hf_compat import extend_cache, new_cache, new_static_cache, reset_cache, tile_cache, with_cache
from ..memory import cache_bytes, parameter_bytes
from ..progress import progress_bar
from ..sharing.apply import compile_fast_path, fast_path_restored, use_fast_path
from . import bytemodel
from .bytemodel import ModelCosts
from .memory import PeakMemory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scenario:
    """One benchmark shape: ``batch`` sequences, a ``context``-token prompt, then ``new_tokens`` decode steps."""

    name: str
    batch: int
    context: int
    new_tokens: int
    note: str = ""

    def __post_init__(self) -> None:
        if self.batch < 1 or self.context < 1 or self.new_tokens < 1:
            raise AttnshareError(
                f"Scenario '{self.name}' needs batch, context and new tokens of at least 1 "
                f"(got {self.batch}, {self.context}, {self.new_tokens})."
            )


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("tiny", 1, 32, 8, "smoke test"),
        Scenario("short", 1, 512, 128, "chat-like: one sequence, short prompt"),
        Scenario("long", 4, 2048, 128, "CPU long context: KV reads rival weight reads"),
        Scenario("gpu-long", 32, 4096, 256, "GPU (bf16): KV-dominated decode"),
    )
}


def get_scenario(name: str, batch: int | None = None, context: int | None = None,
                 new_tokens: int | None = None) -> Scenario:
    """A preset by name, with optional overrides of its shape."""
    if name not in SCENARIOS:
        raise AttnshareError(f"Unknown scenario '{name}'; choose one of: {', '.join(SCENARIOS)}.")
    s = SCENARIOS[name]
    changed = {k: v for k, v in {"batch": batch, "context": context, "new_tokens": new_tokens}.items() if v}
    if not changed:
        return s
    label = s.name + "(" + ",".join(f"{k}={v}" for k, v in changed.items()) + ")"
    return Scenario(label, changed.get("batch", s.batch), changed.get("context", s.context),
                    changed.get("new_tokens", s.new_tokens), s.note)


@dataclass
class Variant:
    """A named model to benchmark; ``build`` returns it (the base, or a copy of the base with plans applied).

    ``eager`` keeps a variant on the eager path with a dynamic cache when the others are compiled (the reference
    the fast path is measured against)."""

    name: str
    build: Callable[[], nn.Module]
    eager: bool = False


def base_variant(base: nn.Module, name: str = "base") -> Variant:
    return Variant(name, lambda: base)


def plan_variant(base: nn.Module, plans, name: str | None = None) -> Variant:
    """A copy of ``base`` with ``plans`` applied (the base itself is left untouched)."""
    plans = plans if isinstance(plans, list) else [plans]
    label = name or "; ".join(p.summary() for p in plans)
    return Variant(label, lambda: apply(copy.deepcopy(base), plans))


def artifact_variant(base: nn.Module, path: str | Path, name: str | None = None) -> Variant:
    """A copy of ``base`` rebuilt from an attnshare artifact (refused if the artifact has another base)."""
    read_artifact(path)  # fail on a bad artifact before any model work
    return Variant(name or Path(path).name, lambda: load(path, model=copy.deepcopy(base))[0])


@dataclass
class BenchConfig:
    """How the benchmark runs (the shape comes from --scenario, optionally overridden)."""

    scenario: str = field(default="short", metadata={"help": "preset shape: " + ", ".join(
        f"{s.name} (batch {s.batch}, {s.context}+{s.new_tokens})" for s in SCENARIOS.values())})
    batch: int = field(default=0, metadata={"help": "override the scenario's batch (0: keep)"})
    context: int = field(default=0, metadata={"help": "override the scenario's prompt length (0: keep)"})
    new_tokens: int = field(default=0, metadata={"help": "override the scenario's decode steps (0: keep)"})
    repeats: int = field(default=3, metadata={"help": "measured repeats per variant (medians are reported)"})
    warmup: int = field(default=1, metadata={"help": "unmeasured warm-up runs per variant (reduced shape on CPU)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto (cuda when available)"})
    prefill_batch: int = field(default=0, metadata={
        "help": "sequences actually prefilled; their cache is tiled over the batch for decode (0: the whole batch; "
                "1 makes long-context decode affordable on a CPU)"})
    synthetic_context: int = field(default=0, metadata={
        "help": "prefill only this many tokens and repeat their cache along the sequence up to the context (decode "
                "cost does not depend on cached values; the prefill columns then describe the short prefill; 0: off)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    max_batch: bool = field(default=False, metadata={
        "help": "decode each variant at the largest batch whose weights + KV cache fit --memory-budget-gb"})
    memory_budget_gb: float = field(default=0.0, metadata={"help": "memory budget (GB = 1e9 bytes) for --max-batch"})
    max_batch_cap: int = field(default=256, metadata={"help": "upper limit on the batch in --max-batch mode"})
    profile: bool = field(default=False, metadata={
        "help": "after measuring, profile one more prefill and decode of each variant and add the top ops by self time"})
    note: str = field(default="", metadata={"help": "machine note recorded with the results (e.g. 'shared with other jobs')"})
    seed: int = field(default=0, metadata={"help": "seed of the random prompt tokens"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    cache: str = field(default="auto", metadata={
        "help": "KV cache: dynamic (grows each step), static (preallocated for prompt + new tokens) or auto "
                "(static with --compile, else dynamic)"})
    compile: bool = field(default=False, metadata={
        "help": "run every variant through torch.compile(fullgraph=True) on a static cache (compile time reported "
                "apart), beside the eager base on a dynamic cache"})
    compile_prefill: bool = field(default=True, metadata={
        "help": "with --compile, compile the prefill too (one more graph per variant; --no-compile-prefill keeps it "
                "eager, as HF's generate does)"})
    autotune: bool = field(default=True, metadata={
        "help": "with --compile on CPU, freeze the weights into the graph and autotune every GEMM against inductor's "
                "C++ kernels (faster steps; a first compile of minutes and a packed copy of the weights; "
                "--no-autotune: inductor's defaults)"})
    keep_freed_memory: bool = field(default=True, metadata={
        "help": "the CLI's allocator setting: glibc keeps freed chunks for reuse instead of page-faulting every "
                "large temporary in again (peak memory is then not reported on CPU; --no-keep-freed-memory: the "
                "allocator's defaults, with peaks)"})

    @property
    def cache_kind(self) -> str:
        return "static" if self.cache == "static" or (self.cache == "auto" and self.compile) else "dynamic"

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0:
            raise AttnshareError("--repeats must be at least 1 and --warmup at least 0.")
        if self.device not in ("cpu", "cuda", "auto"):
            raise AttnshareError(f"--device must be cpu, cuda or auto, not '{self.device}'.")
        if self.synthetic_context < 0:
            raise AttnshareError("--synthetic-context must be 0 (off) or a positive number of prefilled tokens.")
        if self.prefill_batch < 0:
            raise AttnshareError("--prefill-batch must be 0 (the whole batch) or a positive number of sequences.")
        if self.max_batch and self.memory_budget_gb <= 0:
            raise AttnshareError("--max-batch needs --memory-budget-gb with a positive budget in GB.")
        if self.cache not in ("auto", "dynamic", "static"):
            raise AttnshareError(f"--cache must be auto, dynamic or static, not '{self.cache}'.")
        if self.compile and self.warmup < 1:
            raise AttnshareError("--compile needs --warmup of at least 1: the warm-up is where each variant compiles "
                                 "(a measured repeat would time the compiler).")
        if self.compile and self.cache == "dynamic":
            raise AttnshareError("--compile needs a static cache (a dynamic one changes shape every step and would "
                                 "recompile); drop --cache dynamic.")
        if self.cache_kind == "static" and (self.max_batch or self.synthetic_context or self.prefill_batch):
            raise AttnshareError("A static cache is filled by a real prefill of the whole batch; drop --max-batch, "
                                 "--synthetic-context and --prefill-batch, or use --cache dynamic without --compile.")


@dataclass
class Sample:
    """One measured run of one variant."""

    prefill_s: float
    decode_s: float
    peak_bytes: int | None


@dataclass
class VariantResult:
    name: str
    batch: int  # decode batch (differs per variant in max-batch mode)
    prefill_batch: int
    params: int
    param_bytes: int
    kv_bytes: int  # measured from the cache after the run (batch x (context + new_tokens) tokens)
    peak_bytes: int | None  # median memory needed beyond the weights: cache + temporaries of the heaviest call
    prefill_s: float
    decode_s: float
    prefill_tok_s: float
    decode_tok_s: float
    prefill_ratio: float  # speed vs base, median of per-repeat ratios
    decode_ratio: float
    ideal_prefill_ratio: float
    ideal_decode_ratio: float
    costs: ModelCosts
    samples: list[Sample] = field(default_factory=list)
    compile_s: float | None = None  # first full-shape prefill + decode step of the warm-up, beyond a measured one
    path: str = "eager, dynamic cache"

    @property
    def prefill_of_ideal(self) -> float:
        return self.prefill_ratio / self.ideal_prefill_ratio

    @property
    def decode_of_ideal(self) -> float:
        return self.decode_ratio / self.ideal_decode_ratio


@dataclass
class BenchResult:
    """Results of one benchmark: renders as a markdown table (``to_markdown``) or JSON (``to_dict``)."""

    scenario: Scenario
    config: BenchConfig
    machine: dict
    variants: list[VariantResult]
    command: str = ""
    date: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"))
    profiles: dict[str, dict[str, list[dict]]] = field(default_factory=dict)  # variant -> phase -> top ops

    def rows(self) -> list[dict]:
        rows = []
        for v in self.variants:
            rows.append({
                "variant": v.name,
                **({"path": v.path, "compile s": "-" if v.compile_s is None else f"{v.compile_s:.1f}"}
                   if self.config.compile or self.config.cache_kind == "static" else {}),
                "batch": v.batch,
                "params": f"{v.params:,}",
                "param MB": _mb(v.param_bytes),
                "KV MB": _mb(v.kv_bytes),
                "peak MB": "n/a" if v.peak_bytes is None else _mb(v.peak_bytes),
                "prefill tok/s": f"{v.prefill_tok_s:.1f}",
                "prefill × (ideal)": f"{v.prefill_ratio:.3f} ({v.ideal_prefill_ratio:.3f})",
                "decode tok/s": f"{v.decode_tok_s:.2f}",
                "decode × (ideal)": f"{v.decode_ratio:.3f} ({v.ideal_decode_ratio:.3f})",
                "decode of ideal": f"{v.decode_of_ideal:.3f}",
                "gain of ideal": _gain(v.decode_ratio, v.ideal_decode_ratio),
            })
        return rows

    def to_markdown(self) -> str:
        s = self.scenario
        pb = self.variants[0].prefill_batch
        mode = (f"max batch under {self.config.memory_budget_gb:g} GB (weights + KV cache); prefill at batch 1"
                if self.config.max_batch else f"batch {s.batch}")
        if not self.config.max_batch and pb != s.batch:
            mode += f" (prefill of {pb} sequence(s), cache tiled to the batch)"
        if 0 < self.config.synthetic_context < s.context:
            mode += (f"; synthetic context: a {self.config.synthetic_context}-token prefill (the prefill columns) "
                     "repeated along the sequence")
        m = self.machine
        lines = [
            (f"Scenario `{s.name}`: {mode}, prompt {s.context} tokens + {s.new_tokens} new tokens; "
            f"{self.config.repeats} interleaved repeats after {self.config.warmup} warm-up, medians. "
            f"Machine: {m['device_name']}, {m['threads']} threads, torch {m['torch']}, transformers "
            f"{m['transformers']}, {m['dtype']}{'; ' + self.config.note if self.config.note else ''}. "
            f"Date {self.date}."),
            "",
        ]
        if self.command:
            lines += [f"Command: `{self.command}`", ""]
        rows = self.rows()
        cols = list(rows[0])
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
        lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
        lines += ["", (
            "Ratios are speed over the base (>1 is faster), median of per-repeat ratios; ideal = byte model (decode: "
            "weight + KV bytes read per step; prefill: FLOPs); gain of ideal = (measured - 1) / (ideal - 1). KV MB "
            "measured from the cache tensors after the run; peak MB = memory needed beyond the weights (cache + "
            "temporaries of the heaviest call)."
        )]
        for name, phases in self.profiles.items():
            for phase, ops in phases.items():
                lines += ["", f"Profile of `{name}`, {phase} (top ops by self time):", "",
                          "| op | self ms | share | calls |", "|---|---|---|---|"]
                lines += [f"| `{o['op']}` | {o['self_ms']:.1f} | {o['share']:.1%} | {o['calls']} |" for o in ops]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        out = {
            "scenario": asdict(self.scenario),
            "config": asdict(self.config),
            "machine": self.machine,
            "command": self.command,
            "date": self.date,
            "profiles": self.profiles,
            "variants": [],
        }
        for v in self.variants:
            d = asdict(v)
            d["costs"] = v.costs.to_dict()
            d["prefill_of_ideal"], d["decode_of_ideal"] = v.prefill_of_ideal, v.decode_of_ideal
            out["variants"].append(d)
        return out


def _gain(measured: float, ideal: float) -> str:
    """Share of the ideal speed-up that was realised: (measured - 1) / (ideal - 1); n/a when nothing is to gain."""
    return f"{(measured - 1) / (ideal - 1):.2f}" if abs(ideal - 1) > 1e-3 else "n/a"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


# ---- measuring ---------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise AttnshareError("--device cuda was asked for but no CUDA device is available; use --device cpu.")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Generation:
    """One variant's generation in progress: a timed prefill into a fresh cache, then timed decode steps.

    Each call is timed on its own, so the harness can run variants in lockstep (one step of each in turn): load
    changes on a shared machine then hit every variant alike. ``peak_bytes`` is the most memory this generation
    needed beyond the weights: its cache plus the temporaries of its heaviest call. ``forward`` replaces the
    model's call in decode steps (a compiled forward), ``prefill`` in the prefill (default: ``forward``); ``cache`` is an empty cache to fill (a static one, reused across repeats so
    a compiled graph sees the same buffers), else a fresh dynamic one.
    """

    def __init__(self, model: nn.Module, ids: torch.Tensor, tile: int = 1, context: int = 0,
                 forward: Callable | None = None, cache=None, prefill: Callable | None = None) -> None:
        self.model, self.ids, self.tile, self.context = model, ids, tile, context
        self.forward = forward or model  # decode steps
        self.prefill_forward = prefill or self.forward
        self.cache = new_cache(model) if cache is None else cache
        self.next: torch.Tensor | None = None
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self.first_step_s: float | None = None
        self.peak_bytes: int | None = 0

    def _timed(self, ids: torch.Tensor, forward: Callable) -> float:
        device = ids.device
        held = cache_bytes(self.cache)
        with torch.inference_mode(), PeakMemory(device) as peak:
            _sync(device)
            start = time.perf_counter()
            out = forward(input_ids=ids, **with_cache(self.model, self.cache), use_cache=True, logits_to_keep=1)
            self.next = out.logits[:, -1:].argmax(-1)  # (B,1) greedy
            _sync(device)
            elapsed = time.perf_counter() - start
        if peak.peak_bytes is None or self.peak_bytes is None:
            self.peak_bytes = None
        else:
            self.peak_bytes = max(self.peak_bytes, held + peak.peak_bytes)
        return elapsed

    def prefill(self) -> None:
        self.prefill_s = self._timed(self.ids, self.prefill_forward)
        if self.context > self.ids.shape[1]:
            extend_cache(self.cache, self.context)
        if self.tile > 1:
            tile_cache(self.cache, self.tile)
            self.next = self.next.repeat_interleave(self.tile, dim=0)  # (B*tile,1)

    def step(self) -> None:
        elapsed = self._timed(self.next, self.forward)
        self.first_step_s = elapsed if self.first_step_s is None else self.first_step_s
        self.decode_s += elapsed

    def sample(self) -> Sample:
        return Sample(self.prefill_s, self.decode_s, self.peak_bytes)


def profile_generation(model: nn.Module, ids: torch.Tensor, tile: int, steps: int, context: int = 0,
                       top: int = 8) -> dict[str, list[dict]]:
    """Top ops by self time of one prefill and of ``steps`` decode steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.device.type == "cuda" else [])
    run = Generation(model, ids, tile, context)
    out = {}
    for phase, work in (("prefill", run.prefill), (f"{steps} decode steps", lambda: [run.step() for _ in range(steps)])):
        with profile(activities=activities) as prof:
            work()
        events = [e for e in prof.key_averages() if e.self_device_time_total or e.self_cpu_time_total]
        key = "self_device_time_total" if ids.device.type == "cuda" else "self_cpu_time_total"
        total = sum(getattr(e, key) for e in events) or 1
        events.sort(key=lambda e: getattr(e, key), reverse=True)
        out[phase] = [{"op": e.key, "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total, "calls": e.count}
                      for e in events[:top]]
    return out


def machine_info(device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"{name} ({os.cpu_count()} cores)"
    return {"device": device.type, "device_name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "dtype": str(dtype).removeprefix("torch.")}


def _prompt(batch: int, length: int, vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)  # (B,T)


def run_bench(variants: list[Variant], scenario: Scenario, config: BenchConfig | None = None,
              command: str = "") -> BenchResult:
    """Benchmark ``variants`` (the first one is the reference, normally the base) under ``scenario``."""
    config = config or BenchConfig()
    if not variants:
        raise AttnshareError("Give at least one variant to benchmark.")
    if len({v.name for v in variants}) != len(variants):
        raise AttnshareError("Variant names must be distinct; name each --artifact or plan differently.")
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    if config.compile:  # the eager base on a dynamic cache (its own copy): the path the compiled variants replace
        reference = variants[0].build
        variants = [*variants, Variant(f"{variants[0].name} (eager)", lambda: copy.deepcopy(reference()), eager=True)]
    models = []
    for v in progress_bar(variants, desc="build variants", show=config.progress):
        models.append(v.build().to(device).eval())
    positions = getattr(models[0].config, "max_position_embeddings", None)
    total = scenario.context + scenario.new_tokens
    if positions and total > positions:
        raise AttnshareError(
            f"The scenario needs {total} positions but the model has {positions}; lower --context or --new-tokens."
        )
    costs = [bytemodel.model_costs(m) for m in models]
    params = [parameter_bytes(m) for m in models]
    batches = _batches(scenario, config, costs, params)
    prefill_batch = 1 if config.max_batch else (config.prefill_batch or scenario.batch)
    if any(b % prefill_batch for b in batches):
        raise AttnshareError(f"--prefill-batch {prefill_batch} must divide the batch {scenario.batch}.")
    vocab = models[0].get_input_embeddings().weight.shape[0]
    synthetic = scenario.context if 0 < config.synthetic_context < scenario.context else 0
    ids = _prompt(prefill_batch, config.synthetic_context if synthetic else scenario.context, vocab, config.seed, device)
    full_warmup = device.type == "cuda" or config.compile  # a compiled graph is built for the measured shapes
    warm_ids = ids if full_warmup else ids[:, : min(scenario.context, 64)]
    warm_new = scenario.new_tokens if device.type == "cuda" else min(scenario.new_tokens, 4)
    with fast_path_restored(models):  # compiled variants take the fast path; the caller's models get theirs back
        paths = [_Path.of(m, v, config, scenario) for v, m in zip(variants, models)]

        n = len(models)
        samples: list[list[Sample]] = [[] for _ in models]
        kv = [0] * n
        firsts: list[Sample | None] = [None] * n  # each variant's first run (where a compiled one compiles)
        bar = progress_bar(total=config.warmup * n * (1 + warm_new) + config.repeats * n * (1 + scenario.new_tokens),
                           desc=f"bench {scenario.name}", unit="call", show=config.progress)
        for rep in range(config.warmup + config.repeats):
            warm = rep < config.warmup
            order = [(j + rep) % n for j in range(n)]  # rotate the order every repeat
            runs = [Generation(models[i], warm_ids if warm else ids, batches[i] // prefill_batch, synthetic,
                               paths[i].forward, paths[i].empty_cache(ids), paths[i].prefill) for i in range(n)]
            for i in order:
                runs[i].prefill()
                bar.update()
            for _ in range(warm_new if warm else scenario.new_tokens):  # lockstep: one step of every variant in turn
                for i in order:
                    runs[i].step()
                    bar.update()
            for i in order:
                if firsts[i] is None:
                    firsts[i] = Sample(runs[i].prefill_s, runs[i].first_step_s or 0.0, None)
                if not warm:
                    samples[i].append(runs[i].sample())
                    kv[i] = cache_bytes(runs[i].cache)
            del runs
        bar.close()

        profiles = {}
        if config.profile:
            for v, m, b in zip(variants, models, batches):
                profiles[v.name] = profile_generation(m, ids, b // prefill_batch, min(scenario.new_tokens, 8), synthetic)

        results = []
        for i, (v, m) in enumerate(zip(variants, models)):
            result = _summarise(v.name, m, samples, i, kv[i], costs, params, batches, prefill_batch, scenario,
                                ids.shape[1])
            result.path = paths[i].label
            if paths[i].compiled and full_warmup and config.warmup:
                steady = result.prefill_s + result.decode_s / scenario.new_tokens
                result.compile_s = max(firsts[i].prefill_s + firsts[i].decode_s - steady, 0.0)
            results.append(result)
        machine = machine_info(device, next(models[0].parameters()).dtype)
        return BenchResult(scenario, config, machine, results, command, profiles=profiles)


@dataclass
class _Path:
    """How one variant runs: its forward (compiled or the model itself) and the kind of cache it fills."""

    forward: Callable  # decode steps
    prefill: Callable
    cache_kind: str
    max_len: int
    model: nn.Module
    compiled: bool
    static: object = None  # the variant's one static cache, made on first use

    @classmethod
    def of(cls, model: nn.Module, variant: Variant, config: BenchConfig, scenario: Scenario) -> _Path:
        compiled = config.compile and not variant.eager
        if compiled:
            use_fast_path(model)  # every compiled variant, the base included: no K/V copy per query head
        device = next(model.parameters()).device
        forward = compile_fast_path(model.forward, device, autotune=config.autotune) if compiled else model
        prefill = forward if config.compile_prefill else model
        kind = "dynamic" if variant.eager else config.cache_kind
        return cls(forward, prefill, kind, scenario.context + scenario.new_tokens, model, compiled)

    @property
    def label(self) -> str:
        if not self.compiled:
            return f"eager, {self.cache_kind} cache"
        return f"compiled{'' if self.prefill is self.forward else ' decode'}, {self.cache_kind} cache"

    def empty_cache(self, ids: torch.Tensor):
        """A fresh dynamic cache (None: Generation makes it), or this variant's one static cache, emptied.

        The static cache is laid out once by an eager one-token forward of ``ids``' batch: its slots take their
        shapes from that first write, so no compiled graph sees an unallocated cache (that graph would be
        replaced by another once the slots exist)."""
        if self.cache_kind == "dynamic":
            return None
        if self.static is None:
            self.static = new_static_cache(self.model, self.max_len)
            with torch.inference_mode():
                self.model(input_ids=ids[:, :1], **with_cache(self.model, self.static), use_cache=True,
                           logits_to_keep=1)
        reset_cache(self.static)
        return self.static


def _batches(scenario: Scenario, config: BenchConfig, costs: list[ModelCosts], params: list[int]) -> list[int]:
    if not config.max_batch:
        return [scenario.batch] * len(costs)
    budget = int(config.memory_budget_gb * 1e9)
    tokens = scenario.context + scenario.new_tokens
    batches = [min(bytemodel.max_batch_under_budget(c, p, tokens, budget), config.max_batch_cap)
               for c, p in zip(costs, params)]
    if min(batches) < 1:
        raise AttnshareError(
            f"A {config.memory_budget_gb:g} GB budget does not hold the weights plus one sequence's cache; raise "
            "--memory-budget-gb."
        )
    return batches


def _summarise(name, model, samples, i, kv, costs, params, batches, prefill_batch, scenario,
               prefill_tokens) -> VariantResult:
    mine, base = samples[i], samples[0]
    b, b0 = batches[i], batches[0]
    c = scenario.context
    prefill_ratio = statistics.median(r.prefill_s / s.prefill_s for s, r in zip(mine, base))
    # decode speed = tokens/s; batches may differ (max-batch mode), so compare throughputs
    decode_ratio = statistics.median((b / s.decode_s) / (b0 / r.decode_s) for s, r in zip(mine, base))
    ideal_prefill = bytemodel.ideal_ratio(bytemodel.prefill_flops(costs[0], prefill_batch, prefill_tokens),
                                          bytemodel.prefill_flops(costs[i], prefill_batch, prefill_tokens))
    # throughput ideal: tokens per byte read, over the decode steps (step k attends context + k + 1 keys)
    base_bytes = bytemodel.decode_bytes(costs[0], b0, c + 1, scenario.new_tokens) / b0
    my_bytes = bytemodel.decode_bytes(costs[i], b, c + 1, scenario.new_tokens) / b
    prefill_s = statistics.median(s.prefill_s for s in mine)
    decode_s = statistics.median(s.decode_s for s in mine)
    peaks = [s.peak_bytes for s in mine if s.peak_bytes is not None]
    return VariantResult(
        name=name, batch=b, prefill_batch=prefill_batch, params=model.num_parameters(), param_bytes=params[i],
        kv_bytes=kv, peak_bytes=int(statistics.median(peaks)) if peaks else None,
        prefill_s=prefill_s, decode_s=decode_s,
        prefill_tok_s=prefill_batch * prefill_tokens / prefill_s, decode_tok_s=b * scenario.new_tokens / decode_s,
        prefill_ratio=prefill_ratio, decode_ratio=decode_ratio,
        ideal_prefill_ratio=ideal_prefill, ideal_decode_ratio=bytemodel.ideal_ratio(base_bytes, my_bytes),
        costs=costs[i], samples=mine,
    )
