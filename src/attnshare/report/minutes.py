"""ppl of trained artifacts against their training budget (e.g. LiSA at 1, 5 and 15 minutes): a table and a PNG.

``python -m attnshare.report.minutes out/m53-1 out/m53-5 out/m53-15 --png docs/img/lisa-minutes.png``

``--rows`` keeps the rows of an earlier ``--json`` (artifacts are large and live in ``out/``; the rows are committed
beside the PNG, ``docs/results/lisa-minutes.json``), so a new budget joins the curve without re-training the others.

Each artifact is what ``attnshare train --minutes M --out DIR`` wrote: its ``train.json`` gives the
budget, the layer-local and end-to-end steps, minutes and tokens. Perplexity is measured here (SPEC §6 protocol on
``--text``, first ``--max-tokens`` tokens) and the base once, so every row is comparable.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..artifact import load
from ..errors import AttnshareError
from ..evaluate.perplexity import PerplexityConfig, perplexity
from ..models.loading import load_base
from ..sharing.state import state_of
from .plots import curve_plot


def read_training(path: Path, budget: float | None = None) -> dict:
    """The training record of an artifact (``train.json``), with its budget in minutes (``budget`` where the record
    has none: written by an attnshare older than the field)."""
    file = path / "train.json"
    if not file.is_file():
        raise AttnshareError(f"'{path}' has no train.json; pass folders written by `attnshare train --out`.")
    record = json.loads(file.read_text())
    record["budget minutes"] = record.get("budget minutes") or budget
    if record["budget minutes"] is None:
        raise AttnshareError(f"'{file}' records no budget (trained without --minutes, or by an older attnshare); "
                             "pass it with --budgets.")
    return record


def read_rows(path: Path, text: str, max_tokens: int) -> tuple[float, list[dict]]:
    """``(base ppl, rows)`` of a file this report wrote with ``--json``, measured under the same protocol."""
    try:
        data = json.loads(path.read_text())
        base_ppl, rows, measured_on = float(data["base ppl"]), list(data["rows"]), (data["text"], data["max tokens"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AttnshareError(f"--rows '{path}' is not a file this report wrote with --json ({err}).") from None
    if measured_on != (text, max_tokens):
        raise AttnshareError(f"--rows '{path}' was measured on {measured_on[0]} (first {measured_on[1]} tokens), not "
                             f"{text} (first {max_tokens}); pass the same --text and --max-tokens.")
    return base_ppl, rows


def measure_rows(records: dict[str, dict], protocol: PerplexityConfig) -> tuple[float | None, list[dict]]:
    """``(base ppl, rows)``: each artifact's ppl under ``protocol``, the base's measured once (None: no artifacts)."""
    rows, base_ppl = [], None
    for path, record in records.items():
        model, tokenizer = load(path)
        if base_ppl is None:
            base, _ = load_base(state_of(model).identity)
            base_ppl = perplexity(base, tokenizer, protocol, progress=False).ppl
            del base
        ppl = perplexity(model, tokenizer, protocol, progress=False).ppl
        rows.append({"artifact": path, "plan": record["plan"], "budget minutes": record["budget minutes"],
                     "local steps": int(record.get("local_steps", 0)),
                     "local minutes": record.get("local_minutes"), "local tokens": record.get("local_tokens"),
                     "e2e steps": record["steps"], "e2e minutes": record["minutes"], "e2e tokens": record["tokens"],
                     "ppl": ppl, "ratio": ppl / base_ppl})
    return base_ppl, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="*", help="folders written by `attnshare train --minutes M`")
    p.add_argument("--rows", help="a --json file of an earlier run of this report: its rows are kept as they were "
                   "measured (same --text and --max-tokens) and the artifacts' rows join them")
    p.add_argument("--label", default="LiSA", help="name of the curve")
    p.add_argument("--text", default="britannica")
    p.add_argument("--max-tokens", type=int, default=4096, help="perplexity protocol: first N tokens of the text")
    p.add_argument("--budgets", type=float, nargs="+", help="the --minutes of each artifact, in order, for records "
                   "that do not hold it (0: read it from the record)")
    p.add_argument("--png", help="write the curve here")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    try:
        if not args.artifacts and not args.rows:
            raise AttnshareError("nothing to report: pass artifact folders, --rows, or both.")
        budgets = args.budgets or [0.0] * len(args.artifacts)
        if len(budgets) != len(args.artifacts):
            raise AttnshareError(f"--budgets lists {len(budgets)} values for {len(args.artifacts)} artifacts.")
        old_base, rows = read_rows(Path(args.rows), args.text, args.max_tokens) if args.rows else (None, [])
        records = {a: read_training(Path(a), b or None) for a, b in zip(args.artifacts, budgets, strict=True)}
        base_ppl, new_rows = measure_rows(records, PerplexityConfig(text=args.text, max_tokens=args.max_tokens))
        base_ppl = base_ppl or old_base
        if old_base is not None and abs(base_ppl / old_base - 1) > 1e-3:
            raise AttnshareError(f"the base ppl is {base_ppl:.3f} here but {old_base:.3f} in --rows '{args.rows}': "
                                 "the rows would not be comparable (another model, corpus or version?).")
        rows += new_rows
    except AttnshareError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"base ppl {base_ppl:.3f} ({args.text}, first {args.max_tokens} tokens)")
    print("| budget (min) | local steps | e2e steps | e2e tokens | ppl | x base |")
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["budget minutes"]):
        print(f"| {r['budget minutes']:g} | {r['local steps']} | {r['e2e steps']} | {r['e2e tokens']:,} | "
              f"{r['ppl']:.2f} | {r['ratio']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"base ppl": base_ppl, "text": args.text,
                                               "max tokens": args.max_tokens, "rows": rows}, indent=2) + "\n")
    if args.png:
        points = [(r["budget minutes"], r["ratio"]) for r in rows]
        curve_plot({args.label: points}, args.png, xlabel="training budget (minutes)",
                   ylabel=f"perplexity / base ({args.text})", title=f"{args.label}: quality against training minutes",
                   logx=True, reference=1.0)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
