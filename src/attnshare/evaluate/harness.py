"""lm-evaluation-harness adapter: score an in-memory model (base or shared) on lm-eval tasks.

lm-eval is an optional extra (``pip install 'attnshare[eval]'``). Standard datasets cannot be fetched on an offline
machine; local task files (a YAML task over a local JSON/JSONL dataset) in ``include_path`` work anywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ..errors import AttnshareError, require

log = logging.getLogger(__name__)


def task_manager(names: Sequence[str], include_path: str | None = None):
    """An lm-eval TaskManager that knows every task in ``names``, else a one-sentence error naming the unknown ones.

    Indexing lm-eval's thousands of built-in task files takes a minute or more on a small CPU, so when every task
    is found under ``include_path`` the built-ins are not indexed at all.
    """
    tasks = require("lm_eval.tasks", "eval")
    if include_path is not None:
        if not Path(include_path).exists():
            raise AttnshareError(
                f"The lm-eval include path '{include_path}' does not exist; give a folder of task YAML files."
            )
        local = tasks.TaskManager(include_path=str(include_path), include_defaults=False)
        if set(names) <= set(local.all_tasks):
            return local
    manager = tasks.TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [n for n in names if n not in set(manager.all_tasks)]
    if unknown:
        raise AttnshareError(
            f"Unknown lm-eval task(s) {', '.join(unknown)}; list them with `lm-eval ls tasks` or point "
            "--lm-eval-include at the folder of your task YAML files."
        )
    return manager


def wrap_model(model, tokenizer, batch_size: int = 4, max_length: int | None = None):
    """An lm-eval ``HFLM`` around an already-built model (no loading, no hub access)."""
    hf = require("lm_eval.models.huggingface", "eval")
    device = next(model.parameters()).device
    return hf.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device),
                   max_length=max_length)


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """Per-task numeric metrics from an lm-eval results dict (``acc,none`` -> ``acc``; other filters kept)."""
    table = {}
    for task, metrics in results["results"].items():
        row = {}
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or key == "alias":
                continue
            metric, _, filter_name = key.partition(",")
            row[metric if filter_name in ("", "none") else key] = float(value)
        table[task] = row
    return table


def lm_eval_tasks(model, tokenizer, tasks: Sequence[str], include_path: str | None = None, limit: int | None = None,
                  num_fewshot: int | None = None, batch_size: int = 4, seed: int = 0, manager=None) -> dict:
    """Evaluate ``model`` (in memory) on lm-eval ``tasks``; returns ``{"metrics": {task: {metric: v}}, ...}``.

    ``manager`` is a TaskManager from :func:`task_manager` when the caller checked the names already.
    """
    if not tasks:
        raise AttnshareError("Give at least one lm-eval task name.")
    if limit is not None and limit < 1:
        raise AttnshareError("--lm-eval-limit must be at least 1 (or left out for every document).")
    names = list(tasks)
    manager = manager or task_manager(names, include_path)
    evaluator = require("lm_eval.evaluator", "eval")
    was_training = model.training
    model.eval()
    try:
        out = evaluator.simple_evaluate(
            model=wrap_model(model, tokenizer, batch_size), tasks=names, task_manager=manager, limit=limit,
            num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
    metrics = task_metrics(out)
    log.info("lm-eval: %s", metrics)
    return {"metrics": metrics, "tasks": names, "limit": limit, "num_fewshot": num_fewshot,
            "versions": {k: v for k, v in out.get("versions", {}).items()}}
