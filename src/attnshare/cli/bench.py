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

    from ..api import read_artifact
    from ..arch import geometry
    from ..bench.harness import BenchConfig, artifact_variant, base_variant, get_scenario, plan_variant, run_bench
    from ..config import dataclass_from_args
    from ..errors import AttnshareError
    from ..models.loading import model_identity
    from .common import check_out_file, load_from_args, prepare_plans, write_json

    config = dataclass_from_args(BenchConfig, args)
    scenario = get_scenario(config.scenario, config.batch, config.context, config.new_tokens)
    make_plans = prepare_plans(args, required=False)  # bad flags and plan files fail before the slow model load
    if make_plans is None and not args.artifact:
        raise AttnshareError("Give a variant to compare with the base: --method NAME, --plan FILE or --artifact DIR.")
    artifacts = {a: read_artifact(a) for a in args.artifact}  # bad artifacts fail before the model load
    check_out_file(args.json, "--json")
    check_out_file(args.markdown, "--markdown", "bench.md")
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    base, _ = load_from_args(args)
    fingerprint = model_identity(base)["fingerprint"]
    for path, meta in artifacts.items():  # variants are built lazily, after the base ran: check them first
        if meta["base"].get("fingerprint") != fingerprint:
            raise AttnshareError(
                f"The artifact '{path}' was made for base model '{meta['base'].get('base_model')}', not for "
                f"--model {args.model}; bench it with --model {meta['base'].get('base_model')}."
            )
    variants = [base_variant(base)]
    if make_plans is not None:
        plans = make_plans(base)
        for plan in plans:  # a plan that does not fit fails before any variant is built or timed
            plan.validate(geometry(base))
        name = args.method or Path(args.plan).stem
        variants.append(plan_variant(base, plans, name=name))
    variants += [artifact_variant(base, a) for a in args.artifact]
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
