"""attnshare sweep: one method at several budgets, planned and measured against the base in one process."""

from __future__ import annotations

import argparse


def add_parser(sub, name: str) -> None:
    from ..config import add_dataclass_args
    from ..evaluate.perplexity import PerplexityConfig
    from .common import add_method_args, add_model_args

    p = sub.add_parser(
        name,
        help="plan and measure a method at several budgets (ppl, parameters, KV cache vs base)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  attnshare sweep --method sa --vary budget --values 1 2 4 8 12 --align-heads\n"
        "  attnshare sweep --method directshare --vary ratio --values 0.05 0.1 0.2 0.3 --match qkv\n"
        "  attnshare sweep --method sa --vary budget --values 2 4 --max-tokens 4096 --plot out/sa.png\n"
        "  attnshare sweep --method drop --vary budget --values 1 2 4 --plot out/drop.png       # baseline\n"
        "  attnshare sweep --method layerdrop --vary kv_saving --values 0.0667 0.1333 --plot out/layerdrop.png",
    )
    add_model_args(p)
    add_method_args(p)
    add_dataclass_args(p, PerplexityConfig)
    p.add_argument("--vary", required=True, help="the method's config field to vary (e.g. budget, ratio, fraction)")
    p.add_argument("--values", required=True, nargs="+", help="values of --vary, one variant each")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--plot", default=None, help="write a Pareto plot (ppl ratio vs saving) to this PNG")
    p.set_defaults(run=run)


def sweep_configs(method, args) -> list:
    """One config of ``method`` per value of ``--vary``, the other fields from the flags."""
    import dataclasses
    import typing

    from ..config import _base_type, dataclass_from_args
    from ..errors import AttnshareError

    hints = typing.get_type_hints(method.config_cls)
    numeric = sorted(f.name for f in dataclasses.fields(method.config_cls)
                     if _base_type(hints[f.name]) in (int, float) and f.init)
    if args.vary not in numeric:
        known = {f.name for f in dataclasses.fields(method.config_cls)}
        what = "no numeric setting" if args.vary in known else "no setting"
        raise AttnshareError(f"{method.name} has {what} '{args.vary}'; vary one of: {', '.join(numeric)}.")
    kind = _base_type(hints[args.vary])
    try:
        values = [kind(v) for v in args.values]
    except ValueError as e:
        raise AttnshareError(f"--values for {args.vary} must be {kind.__name__} numbers ({e}).") from e
    return [dataclass_from_args(method.config_cls, args, **{args.vary: v}) for v in values]


def run(args) -> int:
    from ..config import dataclass_from_args
    from ..errors import AttnshareError, require
    from ..evaluate.perplexity import PerplexityConfig
    from ..methods import get_method
    from ..report.variants import baseline, measure_plans
    from .common import check_out_file, check_text, load_from_args, print_table, write_json

    if not args.method:
        raise AttnshareError("Give --method NAME to sweep.")
    if args.plan:
        raise AttnshareError("attnshare sweep makes its own plans from --method; drop --plan.")
    method = get_method(args.method)
    configs = sweep_configs(method, args)  # bad --vary/--values are refused before the model loads
    ppl_config = dataclass_from_args(PerplexityConfig, args)
    check_text(ppl_config.text)
    check_text(getattr(configs[0], "calib_text", None), "--calib-text")
    check_out_file(args.json, "--json")
    check_out_file(args.plot, "--plot", "pareto.png")
    if args.plot:
        require("matplotlib", "plot")
    model, tokenizer = load_from_args(args)
    plans = method.make_plans(model, configs)  # bad budgets fail here, before the (slow) base perplexity
    base = baseline(model, tokenizer, ppl_config)
    rows = [measure_plans(model, tokenizer, plan, ppl_config, base, name=f"{args.vary}={getattr(config, args.vary)}",
                          method=method.name) for config, plan in zip(configs, plans)]
    table = [{"variant": r.name, "plan": r.plan, "ppl": r.ppl, "x base": r.ppl_ratio,
              "params saved %": 100 * r.params_saved, "KV saved %": 100 * r.kv_saved} for r in rows]
    print(f"base ppl {base.ppl:.3f} ({ppl_config.text}, {ppl_config.max_tokens} tokens, window {ppl_config.window})")
    print_table(table)
    write_json(args.json, {"base": base.__dict__, "protocol": ppl_config.__dict__, "rows": [r.to_dict() for r in rows]})
    if args.plot:
        from ..report.plots import Point, pareto_plot

        kv = any(r.kv_saved for r in rows)
        points = [Point(r.method, r.name, r.kv_saved if kv else r.params_saved, r.ppl_ratio) for r in rows]
        pareto_plot(points, args.plot, xlabel=f"{'KV cache' if kv else 'parameters'} saved (%)",
                    title=f"{method.name}: perplexity vs saving")
        print(f"wrote {args.plot}")
    return 0
