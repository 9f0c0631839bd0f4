"""The one training loop shared by LiSA, SA healing and PostShare, built on ``accelerate``.

Only the chosen parameters train (AdamW); everything else is frozen. Data are deterministic token blocks of a text,
in an order fixed by the seed; each optimizer step consumes one *global batch* of
``batch_size * num_processes * grad_accum`` blocks, so a run on N processes with ``batch_size / N`` sees the same
global batches (and, up to float rounding, the same losses) as a run on one process. Checkpoints are safetensors +
JSON and resume exactly: the loss curve of an interrupted and resumed run equals that of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..data import load_text, token_blocks, tokenize_text
from ..errors import AttnshareError
from ..progress import progress_bar
from .losses import Objective
from .samples import TEACHER_TEXT, teacher_samples

log = logging.getLogger(__name__)

Trainable = Callable[[str, torch.nn.Parameter], bool] | Iterable[str] | Iterable[tuple[str, torch.nn.Parameter]] | None

CHECKPOINT_FORMAT = 1
DISTILL_TARGETS = ("auto", "logits", "hidden")
SCHEDULE_CLOCKS = ("auto", "steps", "time")
_STATE_FILE = "state.json"


# -------------------------------------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Training: data, optimiser, schedule, budget and checkpoints (shared by LiSA, SA healing and PostShare)."""

    text: str = field(default="plays", metadata={"help": "named text (plays, britannica, hamlet, pyref), a UTF-8 file, or "
                                                         "'teacher': text sampled from the teacher itself (cached)"})
    teacher_tokens: int = field(default=65536, metadata={"help": "tokens sampled from the teacher for --text teacher"})
    max_tokens: int | None = field(default=None, metadata={"help": "use only the first N tokens of the text"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training block"})
    batch_size: int = field(default=4, metadata={"help": "blocks per process per micro-step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    warmup: int = field(default=0, metadata={"help": "linear warm-up steps"})
    schedule: str = field(
        default="cosine", metadata={"help": "learning-rate decay after warm-up", "choices": ["cosine", "linear", "constant"]}
    )
    schedule_by: str = field(
        default="steps", metadata={"help": "what the decay follows: optimizer steps (--max-steps), or the time budget "
                                          "(--minutes: the learning rate reaches its end when the budget does); auto: "
                                          "time when --minutes is set", "choices": list(SCHEDULE_CLOCKS)}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0 = no clipping)"})
    max_steps: int = field(default=100, metadata={"help": "optimizer steps"})
    max_minutes: float | None = field(
        default=None, metadata={"help": "wall-clock budget; stop cleanly when reached", "aliases": ["minutes"]}
    )
    seed: int = field(default=0, metadata={"help": "seed for data order and initialisation"})
    log_every: int = field(default=10, metadata={"help": "log the loss every N steps"})
    checkpoint_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    out_dir: str | None = field(default=None, metadata={"help": "folder for checkpoints (none = no checkpoints)"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in --out-dir"})
    distill_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the KL distillation"})
    attention_kl_weight: float = field(default=0.0, metadata={"help": "weight of the per-layer attention-map KL"})
    distill_target: str = field(
        default="auto", metadata={"help": "what distillation matches: next-token logits (KL over the vocabulary), or "
                                          "the LM head's input under the teacher's mean Fisher metric (hidden: "
                                          "second-order KL, cost per token independent of the vocabulary); auto: "
                                          "the method's choice (LiSA: hidden; others: logits)",
                                  "choices": list(DISTILL_TARGETS)}
    )
    cpu: bool = field(default=False, metadata={"help": "train on the CPU even when a CUDA GPU is present"})
    mixed_precision: str = field(default="no", metadata={"help": "autocast precision", "choices": ["no", "bf16"]})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        positive_ints = ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "teacher_tokens")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise AttnshareError(f"{name} must be a positive whole number, got {value!r}.")
        if self.seq_len < 2:
            raise AttnshareError(f"seq_len must be at least 2 tokens to predict a next token, got {self.seq_len}.")
        if self.text == TEACHER_TEXT and self.teacher_tokens < self.seq_len:
            raise AttnshareError(f"teacher_tokens ({self.teacher_tokens}) must be at least seq_len ({self.seq_len}).")
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise AttnshareError(f"max_tokens ({self.max_tokens}) must be at least seq_len ({self.seq_len}).")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise AttnshareError(f"lr must be a positive finite number, got {self.lr!r}.")
        if self.weight_decay < 0:
            raise AttnshareError(f"weight_decay must be zero or positive, got {self.weight_decay!r}.")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise AttnshareError(f"betas must be two numbers in [0, 1), got {self.betas!r}.")
        if self.warmup < 0 or self.checkpoint_every < 0 or self.max_grad_norm < 0:
            raise AttnshareError("warmup, checkpoint_every and max_grad_norm must be zero or positive.")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise AttnshareError(f"schedule must be cosine, linear or constant, got {self.schedule!r}.")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise AttnshareError(f"max_minutes must be positive (or left unset), got {self.max_minutes!r}.")
        if not self.distill_temperature > 0 or self.attention_kl_weight < 0:
            raise AttnshareError("distill_temperature must be positive and attention_kl_weight zero or positive.")
        if self.schedule_by not in SCHEDULE_CLOCKS:
            raise AttnshareError(f"schedule_by must be one of {', '.join(SCHEDULE_CLOCKS)}, got {self.schedule_by!r}.")
        if self.schedule_by == "time" and self.max_minutes is None:
            raise AttnshareError("--schedule-by time decays over the time budget; set --minutes too.")
        if self.distill_target not in DISTILL_TARGETS:
            raise AttnshareError(f"distill_target must be one of {', '.join(DISTILL_TARGETS)}, got {self.distill_target!r}.")
        if self.distill_target == "hidden" and self.distill_temperature != 1.0:
            raise AttnshareError("--distill-target hidden matches the temperature-1 distributions; drop "
                                 "--distill-temperature or distil the logits.")
        if self.mixed_precision not in ("no", "bf16"):
            raise AttnshareError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}.")
        if self.resume and not self.out_dir:
            raise AttnshareError("resume needs out_dir, the folder that holds the checkpoints; pass --out-dir.")


@dataclass
class TrainResult:
    losses: list[tuple[int, float]]  # (step, mean loss of that optimizer step), 1-based steps, all runs of a resume
    tokens: int  # tokens seen by the optimizer (all processes, all runs of a resume)
    seconds: float  # wall-clock seconds of this run
    steps: int  # optimizer steps completed (all runs of a resume)
    stopped: str  # "max_steps" or "max_minutes"
    checkpoint: str | None = None  # folder of the last checkpoint written, if any
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's metrics at the last step

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- pure helpers


def lr_factor(step: int, warmup: int, max_steps: int, schedule: str, progress: float | None = None) -> float:
    """Learning-rate multiplier for 0-based optimizer ``step``: linear warm-up, then cosine/linear decay or flat.

    The decay follows the steps after warm-up, or ``progress`` (0..1, the share of a time budget spent) if given."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if progress is None:
        progress = (step - warmup) / max(1, max_steps - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def time_progress(elapsed: float, budget: float, resumed_at: float = 0.0) -> float:
    """Share (0..1) of a time schedule reached after ``elapsed`` of this run's ``budget`` seconds, for a run that
    resumed a schedule already ``resumed_at`` through (it decays the rest over its own budget)."""
    return min(1.0, resumed_at + (1.0 - resumed_at) * elapsed / budget)


def batch_indices(
    num_blocks: int, step: int, micro: int, process: int, num_processes: int, batch_size: int, grad_accum: int, seed: int
) -> torch.Tensor:
    """Block indices (batch_size,) that ``process`` uses at micro-step ``micro`` of 0-based optimizer ``step``.

    Each epoch is a seeded permutation of the blocks cut into global batches of
    ``batch_size * num_processes * grad_accum`` (the incomplete tail is dropped); a global batch is laid out as
    (grad_accum, num_processes, batch_size), so it does not depend on how it is split across processes.
    """
    global_batch = batch_size * num_processes * grad_accum
    per_epoch = num_blocks // global_batch
    if per_epoch == 0:
        raise AttnshareError(
            f"The text gives {num_blocks} blocks, fewer than one global batch of {global_batch}; use a longer text, "
            "a shorter seq_len or a smaller batch."
        )
    epoch, index = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_blocks, generator=gen)  # (num_blocks,)
    batch = order[index * global_batch : (index + 1) * global_batch].view(grad_accum, num_processes, batch_size)
    return batch[micro, process]  # (batch_size,)


def select_trainable(model: torch.nn.Module, trainable: Trainable) -> list[str]:
    """Names of the parameters to train: all (None), those a predicate ``(name, param) -> bool`` accepts, or a
    given list of names or ``(name, param)`` pairs."""
    named = dict(model.named_parameters())
    if trainable is None:
        names = list(named)
    elif callable(trainable):
        names = [n for n, p in named.items() if trainable(n, p)]
    else:
        names = [item[0] if isinstance(item, tuple) else item for item in trainable]
        unknown = [n for n in names if n not in named]
        if unknown:
            raise AttnshareError(f"The model has no parameter named {unknown[0]!r}; pass names from model.named_parameters().")
    if not names:
        raise AttnshareError("No parameter was selected for training; check the trainable names or predicate.")
    return names


def on_cpu(config: TrainConfig) -> bool:
    """Whether training runs on the CPU. Without CUDA, ``cpu=True`` is what makes several launched processes form a
    gloo process group."""
    return config.cpu or not torch.cuda.is_available()


def load_blocks(config: TrainConfig, tokenizer=None, data: torch.Tensor | None = None, teacher=None) -> torch.Tensor:
    """Training blocks (N, seq_len): from ``data`` (1-D token ids or (N, T) blocks) or from ``config.text`` (samples
    of ``teacher`` when the text is 'teacher')."""
    if data is None:
        if tokenizer is None:
            raise AttnshareError("Training needs a tokenizer for the text, or pre-tokenized data.")
        if config.text != TEACHER_TEXT:
            data = tokenize_text(tokenizer, load_text(config.text), config.max_tokens)
        elif teacher is None:
            raise AttnshareError("--text teacher samples the teacher, and this training has none (it does not "
                                 "distil); train on a named text or a text file instead.")
        else:
            from accelerate import PartialState

            # Launched on several processes, the main one draws (and caches) the samples and the others read them.
            with PartialState(cpu=on_cpu(config)).main_process_first():
                data = teacher_samples(teacher, tokenizer, config.teacher_tokens, config.seq_len, config.seed,
                                       progress=config.progress)
    ids = data.reshape(-1)[: config.max_tokens] if config.max_tokens else data.reshape(-1)  # (n,)
    return token_blocks(ids.long(), config.seq_len)  # (N, seq_len)


# ----------------------------------------------------------------------------------------------- checkpoints


def flatten_optimizer(state: dict, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into safetensors tensors keyed ``"<param>::<field>"`` and JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{names[index]}::{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(names[index], {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, names: list[str]) -> dict:
    """Inverse of :func:`flatten_optimizer` for the same parameter ``names`` (in optimizer order)."""
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, field_name = key.rsplit("::", 1)
        state.setdefault(index[name], {})[field_name] = value
    for name, values in meta["scalars"].items():
        state.setdefault(index[name], {}).update(values)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    return tensors, {"python": json.loads(json.dumps(random.getstate()))}


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder (its state.json is written last), or None."""
    folders = sorted(Path(out_dir).glob("checkpoint-*"))
    complete = [f for f in folders if (f / _STATE_FILE).is_file()]
    return complete[-1] if complete else None


def save_checkpoint(folder: Path, model, optimizer, names: list[str], state: dict, accelerator) -> None:
    """Write trainable params, optimizer, per-process RNG and JSON state; state.json last marks it complete."""
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    rng, rng_meta = _rng_state()
    save_file(rng, str(folder / f"rng-{accelerator.process_index}.safetensors"))
    (folder / f"rng-{accelerator.process_index}.json").write_text(json.dumps(rng_meta))
    if accelerator.is_main_process:
        params = dict(model.named_parameters())
        save_file({n: params[n].detach().cpu().clone().contiguous() for n in names}, str(folder / "trainable.safetensors"))
        opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict(), names)
        save_file(opt_tensors, str(folder / "optimizer.safetensors"))
        state = {**state, "optimizer": opt_meta, "trainable": names, "format": CHECKPOINT_FORMAT}
        accelerator.wait_for_everyone()
        (folder / _STATE_FILE).write_text(json.dumps(state, indent=1))
        for old in Path(folder.parent).glob("checkpoint-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
    else:
        accelerator.wait_for_everyone()
    accelerator.wait_for_everyone()


def load_checkpoint(
    folder: Path, model, optimizer, names: list[str], fingerprint: str, process: int, layout: dict | None = None
) -> dict:
    """Restore a checkpoint into ``model`` and ``optimizer``; returns its JSON state.

    Refuses a checkpoint of another plan (``fingerprint``), other trainable parameters, or another data ``layout``
    (block length, global batch, seed), which would silently change what the resumed steps see.
    """
    try:
        state = json.loads((folder / _STATE_FILE).read_text())
        params_saved = load_file(str(folder / "trainable.safetensors"))
        opt_saved = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise AttnshareError(f"The checkpoint in {folder} is missing or corrupt ({e}); delete it or drop --resume.") from e
    if state.get("fingerprint") != fingerprint:
        raise AttnshareError(
            f"The checkpoint in {folder} was made for another plan or model; use another --out-dir or drop --resume."
        )
    if state.get("trainable") != names:
        raise AttnshareError(
            f"The checkpoint in {folder} trains other parameters than this run; use another --out-dir or drop --resume."
        )
    if layout is not None and state.get("layout") != layout:
        raise AttnshareError(
            f"The checkpoint in {folder} was made with data layout {state.get('layout')} but this run has {layout}; "
            "keep seq_len, seed and batch_size x processes x grad_accum unchanged to resume."
        )
    optimizer.load_state_dict(unflatten_optimizer(opt_saved, state["optimizer"], names))  # validates first
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_(params_saved[n])
    rng_file = folder / f"rng-{process}.safetensors"
    if rng_file.is_file():
        _set_rng_state(load_file(str(rng_file)), json.loads((folder / f"rng-{process}.json").read_text()))
    else:
        log.warning("Checkpoint %s has no RNG state for process %d; random streams will differ.", folder, process)
    return state


# ---------------------------------------------------------------------------------------------------- the loop


def _mean_metrics(per_micro: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for m in per_micro for k in m})
    return {k: sum(m.get(k, 0.0) for m in per_micro) / len(per_micro) for k in keys}


def train(
    model,
    objective: Objective,
    config: TrainConfig | None = None,
    teacher=None,
    trainable: Trainable = None,
    *,
    tokenizer=None,
    data: torch.Tensor | None = None,
    fingerprint: str = "",
) -> TrainResult:
    """Train the ``trainable`` parameters of ``model`` in place to minimise ``objective``; everything else is frozen.

    ``objective(model, batch, teacher) -> (loss, metrics)`` gets ``batch = {"input_ids": (B, T)}``. ``teacher`` is
    passed through untouched (moved to the training device); objectives run it under ``no_grad``. Data come from
    ``data`` (token ids) or from ``config.text`` encoded by ``tokenizer``. ``fingerprint`` names the plan being
    trained; a checkpoint made with another fingerprint is refused on resume.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config = config or TrainConfig()
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and config.seq_len > limit:
        raise AttnshareError(f"seq_len {config.seq_len} is longer than the model's context of {limit}; use {limit} or less.")
    blocks = load_blocks(config, tokenizer, data, teacher)  # (N, seq_len)
    names = select_trainable(model, trainable)

    accelerator = Accelerator(cpu=on_cpu(config), mixed_precision=config.mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(config.seed + rank)
    batch_indices(blocks.shape[0], 0, 0, 0, world, config.batch_size, config.grad_accum, config.seed)  # size check

    params = dict(model.named_parameters())
    was_requires_grad = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    for n, p in params.items():
        p.requires_grad_(n in names)
    try:
        model.train()
        wrapped = accelerator.prepare(model)
        if teacher is not None:
            teacher.to(accelerator.device)
        optimizer = torch.optim.AdamW(
            [params[n] for n in names], lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        return _run(wrapped, model, objective, teacher, optimizer, names, blocks, config, accelerator, fingerprint)
    finally:
        for n, p in params.items():
            p.requires_grad_(was_requires_grad[n])
        model.train(was_training)


def _run(wrapped, model, objective, teacher, optimizer, names, blocks, config, accelerator, fingerprint) -> TrainResult:
    rank, world = accelerator.process_index, accelerator.num_processes
    out_dir = Path(config.out_dir) if config.out_dir else None
    start_step, tokens, losses, checkpoint, resumed_at = 0, 0, [], None, 0.0
    by_time = config.max_minutes is not None and config.schedule_by in ("auto", "time")
    global_batch = config.batch_size * world * config.grad_accum  # blocks per optimizer step
    tokens_per_step = global_batch * config.seq_len
    layout = {"seq_len": config.seq_len, "global_batch": global_batch, "seed": config.seed}
    if config.resume:
        folder = latest_checkpoint(out_dir)
        if folder is None:
            raise AttnshareError(f"There is no checkpoint in {out_dir} to resume from; drop --resume to start fresh.")
        state = load_checkpoint(folder, model, optimizer, names, fingerprint, rank, layout)
        start_step, tokens, losses = state["step"], state["tokens"], [tuple(x) for x in state["losses"]]
        resumed_at = float(state.get("progress", 0.0))
        checkpoint = str(folder)
        log.info("Resumed from %s at step %d", folder, start_step)

    params = [p for n, p in model.named_parameters() if n in set(names)]
    bar = progress_bar(
        total=config.max_steps, initial=start_step, desc="train", unit="step",
        show=config.progress and accelerator.is_main_process,
    )
    start_time, stopped, metrics = time.perf_counter(), "max_steps", {}
    progress = resumed_at if by_time else None  # share of the time schedule reached, agreed by every process

    def checkpoint_now(step: int) -> str | None:
        if out_dir is None:
            return None
        folder = out_dir / f"checkpoint-{step:08d}"
        state = {"step": step, "tokens": tokens, "losses": losses, "fingerprint": fingerprint, "layout": layout,
                 "world_size": world, "config": asdict(config), "progress": progress or 0.0}
        save_checkpoint(folder, model, optimizer, names, state, accelerator)
        return str(folder)

    step = start_step
    while step < config.max_steps:
        lr = config.lr * lr_factor(step, config.warmup, config.max_steps, config.schedule, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, per_micro = torch.zeros((), device=accelerator.device), []
        for micro in range(config.grad_accum):
            idx = batch_indices(blocks.shape[0], step, micro, rank, world, config.batch_size, config.grad_accum, config.seed)
            batch = {"input_ids": blocks[idx].to(accelerator.device)}  # (batch_size, seq_len)
            last = micro == config.grad_accum - 1
            with accelerator.no_sync(wrapped) if not last else nullcontext():
                loss, micro_metrics = objective(wrapped, batch, teacher)
                accelerator.backward(loss / config.grad_accum)
            loss_sum += loss.detach() / config.grad_accum
            per_micro.append(micro_metrics)
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        step_loss = accelerator.reduce(loss_sum, reduction="mean").item()
        if not math.isfinite(step_loss):
            raise AttnshareError(f"The loss became {step_loss} at step {step}; lower --lr or check the model and data.")
        losses.append((step, step_loss))
        metrics = _mean_metrics(per_micro)
        elapsed = time.perf_counter() - start_time
        tok_s = (tokens - start_step * tokens_per_step) / max(elapsed, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tok_s:.0f}")
        if step % config.log_every == 0 or step == config.max_steps:
            log.info("step %d/%d loss %.5f lr %.3g tokens/s %.0f %s", step, config.max_steps, step_loss, lr, tok_s,
                     " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.max_steps:
            checkpoint = checkpoint_now(step)
        if config.max_minutes is not None and step < config.max_steps:
            spent = accelerator.reduce(torch.tensor(elapsed, device=accelerator.device), reduction="max").item()
            if by_time:  # every process takes the same learning rate next step
                progress = time_progress(spent, config.max_minutes * 60, resumed_at)
            if spent >= config.max_minutes * 60:  # every process stops at the same step
                stopped = "max_minutes"
                log.info("Stopping at step %d: the %.3g-minute budget is spent.", step, config.max_minutes)
                break
    bar.close()
    if step > start_step and out_dir is not None:
        checkpoint = checkpoint_now(step)
    seconds = time.perf_counter() - start_time
    return TrainResult(losses=losses, tokens=tokens, seconds=seconds, steps=step, stopped=stopped,
                       checkpoint=checkpoint, metrics=metrics)
