"""attnshare analyze: attention/weight similarity, sensitivity and heatmaps of a base model."""

from __future__ import annotations

import argparse

from ..analysis.analyze import AnalyzeConfig
from ..config import add_dataclass_args, dataclass_from_args
from ..errors import require
from .common import add_model_args, check_out_folder, check_text, load_from_args, print_table


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="attention and weight similarity, sensitivity, heatmaps",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Stream calibration blocks through the model and measure layer x layer and head x head attention "
        "similarity (1 - JS/ln2 and cosine), the best head permutation per layer pair, weight best matches, and "
        "(optionally sampled) per-layer sensitivity; write analysis.json, analysis.safetensors and PNG heatmaps.",
        epilog="examples:\n"
        "  attnshare analyze --model smollm2-135m --out out/analysis\n"
        "  attnshare analyze --tokens 1024 --seq-len 512 --sensitivity-every 0 --out out/quick   # no sensitivity\n"
        "  attnshare analyze --sensitivity-every 3 --head-window 2 --out out/analysis-3",
    )
    add_model_args(p)
    add_dataclass_args(p, AnalyzeConfig)
    p.add_argument("--out", required=True, help="folder for analysis.json, analysis.safetensors and the PNGs")
    p.add_argument("--no-plots", action="store_true", help="write only the raw numbers")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..analysis.analyze import analyze

    config = dataclass_from_args(AnalyzeConfig, args)  # bad flags, texts and outputs fail before the slow model load
    check_text(config.text)
    check_out_folder(args.out)
    if not args.no_plots:
        require("matplotlib", "plot")
    model, tokenizer = load_from_args(args)
    result = analyze(model, config, tokenizer=tokenizer, progress=args.progress)
    paths = result.save(args.out, plots=not args.no_plots)
    rows = []
    numbers = result.to_dict()
    heads = {r["later"]: r for r in result.head_summary() if r["later"] - r["earlier"] == 1}
    sens = {r["layer"]: r for r in result.sensitivity}
    for layer in range(1, result.num_layers):
        row = {"layer": layer, "js sim to l-1": numbers["adjacent_js"][layer - 1],
               "head-mean js sim": numbers["adjacent_mean_map_js"][layer - 1],
               "cosine": numbers["adjacent_cosine"][layer - 1]}
        if layer in heads:
            row |= {"heads unaligned": heads[layer]["unaligned"], "heads aligned": heads[layer]["aligned"]}
        if layer in sens:
            row |= {"KL unaligned": sens[layer]["kl_unaligned"], "KL aligned": sens[layer]["kl_aligned"]}
        rows.append(row)
    print_table(rows, columns=list(dict.fromkeys(k for row in rows for k in row)))
    if result.weight_stats:
        print_table([{"match": result.weights.match, **result.weight_stats}])
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    for path in paths:
        print(f"wrote {path}")
    return 0
