"""attnshare compare: every method and both removal baselines at equal KV-cache and parameter savings."""

from __future__ import annotations

import argparse


def add_parser(sub, name: str) -> None:
    from ..config import add_dataclass_args
    from ..report.compare import CompareConfig
    from .common import add_model_args

    p = sub.add_parser(
        name,
        help="compare methods with the drop/layerdrop baselines at equal KV-cache and parameter savings",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Plan every method at each savings target (each with its own planner, on calibration text), "
        "measure every plan on held-out texts, and write an equal-savings table (compare.md, compare.json) and "
        "Pareto plots (pareto-kv.png, pareto-params.png).",
        epilog="examples:\n"
        "  attnshare compare --kv-saving 0.0667 0.1333 0.2 0.3333 --out out/compare\n"
        "  attnshare compare --kv-saving 0.0667 0.1333 --param-saving 0 --methods sa mix drop layerdrop --out out/kv\n"
        "  attnshare compare --kv-saving 0.2 --artifacts out/lisa53 --out out/with-lisa",
    )
    add_model_args(p)
    add_dataclass_args(p, CompareConfig)
    p.add_argument("--out", required=True, help="folder to write compare.md, compare.json and the plots into")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..config import dataclass_from_args
    from ..errors import AttnshareError, require
    from ..methods import get_method
    from ..report.compare import CompareConfig, compare, markdown, write_compare
    from .common import check_model_args, check_out_folder, check_text, load_from_args

    config = dataclass_from_args(CompareConfig, args)
    for name in config.methods:
        get_method(name)
    for text in config.texts:
        check_text(text, "--texts")
    for path in config.artifacts:
        check_model_args(argparse.Namespace(model=path, num_layers=None))
    out = check_out_folder(args.out)
    if out.is_dir() and any(out.iterdir()) and not (out / "compare.json").is_file():
        raise AttnshareError(f"--out '{out}' is a folder of other files and writing would replace it; pick a new folder.")
    try:
        require("matplotlib", "plot")
        plot = True
    except AttnshareError:
        plot = False
    model, tokenizer = load_from_args(args)
    base, rows = compare(model, tokenizer, config)
    print(markdown(base, rows, config))
    write_compare(base, rows, config, out, plot=plot)
    print(f"wrote {out}/compare.md, compare.json" + (", pareto-kv.png, pareto-params.png" if plot else
                                                     " (no plots: install attnshare[plot])"))
    return 0
