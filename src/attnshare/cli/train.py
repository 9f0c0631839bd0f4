"""attnshare train: plan, apply and train a method (LiSA, SA healing, PostShare), then write its artifact."""

from __future__ import annotations

import argparse


def add_parser(sub, name: str) -> None:
    from ..config import add_dataclass_args
    from ..training import TrainConfig
    from .common import add_method_args, add_model_args

    p = sub.add_parser(
        name,
        help="train a sharing method on the frozen model and save an artifact",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  attnshare train --method lisa --fraction 0.6 --minutes 15 --out out/lisa\n"
        "  attnshare train --method sa --receivers 23 24 25 26 --max-steps 200 --out out/sa-healed\n"
        "  accelerate launch --num_processes 2 -m attnshare train --method lisa --out out/lisa-ddp",
    )
    add_model_args(p)
    add_method_args(p)
    add_dataclass_args(p, TrainConfig)
    p.add_argument("--out", required=True, help="artifact folder to write (checkpoints go to OUT-checkpoints unless --out-dir)")
    p.add_argument("--eval", action="store_true", help="also measure perplexity (SPEC protocol) before and after")
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    import attnshare

    from ..arch import geometry
    from ..config import dataclass_from_args
    from ..errors import AttnshareError
    from ..training import TrainConfig
    from ..training.samples import TEACHER_TEXT
    from .common import check_out_folder, check_text, load_from_args, prepare_plans, print_table, write_json

    make_plans = prepare_plans(args)  # bad flags and plan files fail before the slow model load
    config = dataclass_from_args(TrainConfig, args, out_dir=getattr(args, "out_dir", None)
                                 or f"{Path(args.out)}-checkpoints")
    if config.text != TEACHER_TEXT:  # samples of the teacher are drawn (or read from the cache) when training starts
        check_text(config.text)
    check_out_folder(args.out, artifact=True)
    check_out_folder(config.out_dir, "--out-dir")
    model, tokenizer = load_from_args(args)
    plans = make_plans(model)
    if len(plans) != 1:
        raise AttnshareError("attnshare train takes one plan; apply the others first with `attnshare apply`.")
    plans[0].validate(geometry(model))  # a plan that does not fit fails before the (slow) base perplexity
    before = attnshare.perplexity(model, tokenizer) if args.eval else None
    params_before = model.num_parameters()
    result = attnshare.train(model, tokenizer, plans[0], config)
    out = attnshare.save(model, args.out)
    row = {"plan": plans[0].summary(), "steps": result.steps, "tokens": result.tokens,
           "minutes": result.seconds / 60, "budget minutes": config.max_minutes, "final loss": result.losses[-1][1] if result.losses else float("nan"),
           "params": model.num_parameters(), "params saved": params_before - model.num_parameters(),
           **result.metrics}  # the objective's last-step metrics and method checks (PostShare: which weights kept)
    if before is not None:
        after = attnshare.perplexity(model, tokenizer)
        row.update({"base ppl": before.ppl, "ppl": after.ppl, "ratio": after.ppl / before.ppl})
    print_table([row])
    write_json(out / "train.json", {**row, "losses": result.losses, "stopped": result.stopped})
    print(f"artifact: {out}")
    return 0
