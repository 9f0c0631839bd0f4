"""The standard evaluation: perplexity plus the offline zero-shot proxies (and lm-eval tasks), under one config."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data import load_text
from ..errors import AttnshareError
from .perplexity import PerplexityConfig, PerplexityResult, check_context, perplexity
from .proxies import PROXIES, get_proxy, make_proxy_items, score_proxies


@dataclass
class EvalConfig:
    """What `attnshare eval` measures (SPEC §6 protocols)."""

    text: str = field(default="britannica", metadata={"help": "named text (britannica, hamlet, pyref; plays is for calibration) or a file"})
    window: int = field(default=1024, metadata={"help": "perplexity window length in tokens"})
    max_tokens: int = field(default=16384, metadata={"help": "perplexity over the first N tokens"})
    batch_size: int = field(default=4, metadata={"help": "windows (or proxy items) per forward pass"})
    proxy_items: int = field(default=200, metadata={"help": "items per zero-shot proxy task (0 skips proxies)"})
    seed: int = field(default=0, metadata={"help": "seed for the proxy item generation"})
    proxies: list[str] = field(default_factory=lambda: list(PROXIES),
                               metadata={"help": f"zero-shot proxy tasks to run ({', '.join(PROXIES)})"})
    lm_eval_tasks: list[str] = field(default_factory=list,
                                     metadata={"help": "lm-eval task names to run on the in-memory model"})
    lm_eval_include: str | None = field(default=None, metadata={"help": "folder of extra lm-eval task YAML files"})
    lm_eval_limit: int | None = field(default=None, metadata={"help": "at most N documents per lm-eval task"})
    lm_eval_fewshot: int | None = field(default=None, metadata={"help": "few-shot examples for lm-eval tasks"})

    def __post_init__(self) -> None:
        if self.proxy_items < 0:
            raise AttnshareError("--proxy-items must be 0 or more.")
        for name in self.proxies:
            get_proxy(name)
        if self.lm_eval_limit is not None and self.lm_eval_limit < 1:
            raise AttnshareError("--lm-eval-limit must be at least 1 (or left out for every document).")

    def perplexity_config(self) -> PerplexityConfig:
        return PerplexityConfig(self.text, self.window, self.max_tokens, self.batch_size)


@dataclass
class EvalResult:
    perplexity: PerplexityResult
    proxies: dict[str, dict] = field(default_factory=dict)
    lm_eval: dict = field(default_factory=dict)

    def summary(self) -> dict:
        row = {"text": self.perplexity.text, "ppl": self.perplexity.ppl, "tokens": self.perplexity.tokens,
               "windows": self.perplexity.windows, "window": self.perplexity.window}
        for name, res in self.proxies.items():
            row[f"{name} acc"] = res["accuracy"]
            row[f"{name} items"] = res["items"]
        for task, metrics in self.lm_eval.get("metrics", {}).items():
            row |= {f"{task} {m}": v for m, v in metrics.items() if m != "sample_len"}
        return row

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity.to_dict(), "proxies": self.proxies, "lm_eval": self.lm_eval}


def evaluate(model, tokenizer, config: EvalConfig | None = None, progress: bool = True) -> EvalResult:
    """Perplexity, the zero-shot proxies and any lm-eval tasks of ``model``; bad input fails before any scoring."""
    config = config or EvalConfig()
    check_context(model, config.window)
    items = {}
    if config.proxy_items and config.proxies:
        items = make_proxy_items(config.proxies, load_text(config.text), config.proxy_items, config.seed, config.text)
    manager = None
    if config.lm_eval_tasks:
        from .harness import task_manager

        manager = task_manager(config.lm_eval_tasks, config.lm_eval_include)
    result = EvalResult(perplexity(model, tokenizer, config.perplexity_config(), progress))
    result.proxies = score_proxies(model, tokenizer, items, config.batch_size, progress, config.seed)
    if manager is not None:
        from .harness import lm_eval_tasks

        result.lm_eval = lm_eval_tasks(model, tokenizer, config.lm_eval_tasks, limit=config.lm_eval_limit,
                                       num_fewshot=config.lm_eval_fewshot, batch_size=config.batch_size,
                                       seed=config.seed, manager=manager)
    return result
