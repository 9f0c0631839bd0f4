"""attnshare eval: perplexity and offline zero-shot proxies of a base model or an artifact."""

from __future__ import annotations

from dataclasses import asdict

from ..config import add_dataclass_args, dataclass_from_args
from ..errors import require
from ..evaluate.suite import EvalConfig
from .common import add_model_args, check_out_file, check_text, load_from_args, print_table, write_json


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="perplexity and zero-shot proxies",
        epilog="examples:\n  attnshare eval --model smollm2-135m --text britannica\n"
        "  attnshare eval --model out/sa --text hamlet --proxy-items 100 --json out/sa/eval.json\n"
        "  attnshare eval --model out/sa --lm-eval-tasks mytask --lm-eval-include my_tasks/ --proxy-items 0",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    add_dataclass_args(p, EvalConfig)
    p.add_argument("--json", default="eval.json", help="where to write the results (default: eval.json)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..evaluate.suite import evaluate

    config = dataclass_from_args(EvalConfig, args)  # bad flags, texts and outputs fail before the slow model load
    check_text(config.text)
    check_out_file(args.json, "--json")
    if config.lm_eval_tasks:
        require("lm_eval", "eval")
    model, tokenizer = load_from_args(args)
    result = evaluate(model, tokenizer, config)
    print_table([result.summary()])
    write_json(args.json, {"model": args.model, "config": asdict(config), **result.to_dict()})
    return 0
