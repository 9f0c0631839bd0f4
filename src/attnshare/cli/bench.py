"""attnshare bench: speed and memory of the base model and shared variants side by side, next to the byte model."""

from __future__ import annotations

import argparse


def add_parser(sub, name: str) -> None:
    from ..bench.harness import BenchConfig
    from ..config import add_dataclass_args
    from .common import add_method_args, add_model_args

    p = sub.add_parser(
        name,
        help="benchmark prefill/decode speed, KV cache and memory of base vs shared variants",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  attnshare bench --scenario long --method sa --receivers 23 24 25 26\n"
        "  attnshare bench --scenario short --artifact out/sa-span out/lisa --json out/bench.json\n"
        "  attnshare bench --scenario short --max-batch --memory-budget-gb 2 --plan plan.json\n"
        "  attnshare bench --scenario gpu-long --device cuda --dtype bfloat16 --artifact out/lisa",
    )
    add_model_args(p)
    add_dataclass_args(p, BenchConfig)
    add_method_args(p)
    p.add_argument("--artifact", nargs="+", default=[], help="attnshare artifact folders, one variant each")
    p.add_argument("--json", help="write the full results (every sample, byte-model inputs) to this JSON file")
    p.add_argument("--markdown", help="also write the table to this markdown file")
    p.set_defaults(run=run)


def run(args) -> int:
    import shlex
    import sys
    from pathlib import Path

    from ..bench.harness import BenchConfig, artifact_variant, base_variant, get_scenario, plan_variant, run_bench
    from ..config import dataclass_from_args
    from ..errors import AttnshareError
    from .common import load_from_args, plans_from_args, write_json

    config = dataclass_from_args(BenchConfig, args)
    scenario = get_scenario(config.scenario, config.batch, config.context, config.new_tokens)
    if args.plan:  # read (and validate) the plan file before the slow model load
        from ..plan import load_plans

        load_plans(args.plan)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    base, _ = load_from_args(args)
    variants = [base_variant(base)]
    if args.plan or args.method:
        plans = plans_from_args(args, base)
        name = args.method or Path(args.plan).stem
        variants.append(plan_variant(base, plans, name=name))
    variants += [artifact_variant(base, a) for a in args.artifact]
    if len(variants) == 1:
        raise AttnshareError("Give a variant to compare with the base: --method NAME, --plan FILE or --artifact DIR.")
    command = "attnshare " + shlex.join(sys.argv[1:]) if sys.argv[0].endswith(("attnshare", "__main__.py")) else ""
    result = run_bench(variants, scenario, config, command=command)
    table = result.to_markdown()
    print(table)
    write_json(args.json, result.to_dict())
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table)
        print(f"wrote {path}")
    return 0
