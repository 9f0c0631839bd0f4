"""The standard evaluation: perplexity plus the offline zero-shot proxies, under one config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import AttnshareError
from .perplexity import PerplexityConfig, PerplexityResult, perplexity


@dataclass
class EvalConfig:
    """What `attnshare eval` measures (SPEC §6 protocols)."""

    text: str = field(default="britannica", metadata={"help": "named text (britannica, hamlet, plays) or a file"})
    window: int = field(default=1024, metadata={"help": "perplexity window length in tokens"})
    max_tokens: int = field(default=16384, metadata={"help": "perplexity over the first N tokens"})
    batch_size: int = field(default=4, metadata={"help": "windows (or proxy items) per forward pass"})
    proxy_items: int = field(default=200, metadata={"help": "items per zero-shot proxy task (0 skips proxies)"})
    seed: int = field(default=0, metadata={"help": "seed for the proxy item generation"})

    def __post_init__(self) -> None:
        if self.proxy_items < 0:
            raise AttnshareError("--proxy-items must be 0 or more.")

    def perplexity_config(self) -> PerplexityConfig:
        return PerplexityConfig(self.text, self.window, self.max_tokens, self.batch_size)


@dataclass
class EvalResult:
    perplexity: PerplexityResult
    proxies: dict[str, dict] = field(default_factory=dict)

    def summary(self) -> dict:
        row = {"text": self.perplexity.text, "ppl": self.perplexity.ppl, "tokens": self.perplexity.tokens,
               "windows": self.perplexity.windows, "window": self.perplexity.window}
        for name, res in self.proxies.items():
            row[f"{name} acc"] = res["accuracy"]
        return row

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity.to_dict(), "proxies": self.proxies}


def evaluate(model, tokenizer, config: EvalConfig | None = None, progress: bool = True) -> EvalResult:
    config = config or EvalConfig()
    result = EvalResult(perplexity(model, tokenizer, config.perplexity_config(), progress))
    return result
