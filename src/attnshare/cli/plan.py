"""attnshare plan: turn measured similarity/sensitivity into a plan file under a budget (any registered method)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .common import add_method_args, add_model_args, check_out_file, check_text, load_from_args, print_table

BUDGET_HELP = (
    "the planner's budget; its meaning depends on --method: "
    "sa = number of receiver layers, an integer in 1..L-1 (or use --kv-saving F, the fraction of the KV cache to "
    "save, each receiver saving 1/(2L)); "
    "lisa = fraction of layers that become LiSA layers, in (0, 1) (layer 0 always stays standard); "
    "directshare = sharing ratio, the fraction of attention units (heads, or KV groups under GQA) replaced by their "
    "best earlier match, in [0, 1); "
    "drop / layerdrop (baselines) = number of layers whose attention / whole block is removed, 1..L-1 (or "
    "--kv-saving F, --param-saving F); mix takes --kv-saving F or --param-saving F"
)
BUDGET_FIELDS = ("budget", "fraction", "ratio")  # config field that receives --budget, first one present


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="choose what to share under a budget and write a plan file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure the model on calibration text (the plays; never the evaluation texts) and write a plan "
        "that `attnshare apply --plan` / `attnshare train --plan` use. With --plan FILE, check that an existing plan "
        "fits the model instead.",
        epilog="examples:\n"
        "  attnshare plan --method sa --budget 4 --out plans/sa4.json\n"
        "  attnshare plan --method sa --budget 6 --align-heads --out plans/sa6-aligned.json\n"
        "  attnshare plan --method sa --kv-saving 0.1 --out plans/sa-kv10.json\n"
        "  attnshare plan --method lisa --budget 0.6 --out plans/lisa60.json\n"
        "  attnshare plan --method directshare --budget 0.3 --out plans/ds30.json\n"
        "  attnshare plan --method drop --kv-saving 0.13 --out plans/drop13.json        # baseline\n"
        "  attnshare plan --method mix --kv-saving 0.13 --out plans/mix13.json\n"
        "  attnshare plan --plan plans/sa4.json --model smollm2-135m      # check a plan against a model",
    )
    add_model_args(p)
    p.add_argument("--budget", type=float, default=argparse.SUPPRESS, help=BUDGET_HELP)
    add_method_args(p)
    p.add_argument("--out", help="plan JSON file to write (required unless --plan checks an existing plan)")
    p.set_defaults(run=run)


def budget_field(config_cls: type) -> str | None:
    """The field of a method's config that ``--budget`` sets (``config_cls.budget_field`` overrides the default)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    declared = getattr(config_cls, "budget_field", None)
    if declared in names:
        return declared
    return next((n for n in BUDGET_FIELDS if n in names), None)


def make_config(method, args):
    from ..config import dataclass_from_args
    from ..errors import AttnshareError

    overrides = {}
    if hasattr(args, "budget"):
        target = budget_field(method.config_cls)
        if target is None:
            raise AttnshareError(f"Method '{method.name}' takes no --budget; use its own planning flags (see --help).")
        overrides[target] = args.budget
    return dataclass_from_args(method.config_cls, args, **overrides)


def run(args) -> int:
    from ..arch import geometry
    from ..errors import AttnshareError
    from ..methods import get_method
    from ..paths import write_file
    from ..plan import save_plans
    from ..sharing.registry import load_plans

    if args.plan and args.method:
        raise AttnshareError("Give either --method NAME (to make a plan) or --plan FILE (to check one), not both.")
    check_out_file(args.out, "--out", "plan.json")
    if args.plan:
        plans = load_plans(args.plan)
    elif not args.method:
        raise AttnshareError("Give --method NAME with a --budget (or its own flags), or --plan FILE to check a plan.")
    else:
        if not args.out:
            raise AttnshareError("Give --out FILE for the plan to write.")
        method = get_method(args.method)
        config = make_config(method, args)  # bad budgets fail before the slow model load
        check_text(getattr(config, "calib_text", None), "--calib-text")
    model, _ = load_from_args(args)
    if not args.plan:
        plans = [method.make_plan(model, config)]
    geo = geometry(model)
    for plan in plans:
        plan.validate(geo)
    print_table([{"method": p.method, "plan": p.summary()} for p in plans])
    if args.out:
        out = write_file(Path(args.out), lambda tmp: save_plans(plans, tmp))
        print(f"wrote {out}")
    return 0
