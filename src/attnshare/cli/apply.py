"""attnshare apply: make a plan (or read one) for a method, apply it, and write a small artifact."""

from __future__ import annotations

import argparse

from .common import (
    add_method_args,
    add_model_args,
    check_out_folder,
    load_from_args,
    prepare_plans,
    print_table,
    write_json,
)


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="apply a sharing method and save an artifact",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  attnshare apply --method sa --receivers 23 24 25 26 --out out/sa-span\n"
        "  attnshare apply --method sa --budget 6 --align-heads --out out/sa6\n"
        "  attnshare apply --plan plan.json --out out/planned --eval",
    )
    add_model_args(p)
    add_method_args(p)
    p.add_argument("--out", required=True, help="artifact folder to write")
    p.add_argument("--eval", action="store_true", help="also measure perplexity (SPEC protocol) before and after")
    p.set_defaults(run=run)


def run(args) -> int:
    import attnshare

    from ..arch import geometry

    make_plans = prepare_plans(args)  # bad flags and plan files fail before the slow model load
    check_out_folder(args.out, artifact=True)
    model, tokenizer = load_from_args(args)
    plans = make_plans(model)
    geo = geometry(model)
    for plan in plans:  # a plan that does not fit fails before the (slow) base perplexity
        plan.validate(geo)
    before = attnshare.perplexity(model, tokenizer) if args.eval else None
    params_before = model.num_parameters()
    attnshare.apply(model, plans)
    out = attnshare.save(model, args.out)
    row = {"plans": "; ".join(p.summary() for p in plans), "params": model.num_parameters(),
           "params saved": params_before - model.num_parameters()}
    if before is not None:
        after = attnshare.perplexity(model, tokenizer)
        row.update({"base ppl": before.ppl, "ppl": after.ppl, "ratio": after.ppl / before.ppl})
    print_table([row])
    write_json(out / "apply.json", row)
    print(f"artifact: {out}")
    return 0
