"""Shared CLI helpers: model flags, table printing, JSON output."""

from __future__ import annotations

import json
from pathlib import Path


def add_model_args(p, default: str = "smollm2-135m") -> None:
    p.add_argument("--model", default=default, help=f"embedded name, local folder, HF id or attnshare artifact (default: {default})")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--num-layers", type=int, default=None, help="keep only the first N decoder layers (quick runs)")


def load_from_args(args):
    from ..models import load_model

    return load_model(args.model, dtype=args.dtype, num_layers=args.num_layers)


def add_method_args(p) -> None:
    """``--method``, ``--plan`` and every registered method's planning flags (generated from its config)."""
    from ..config import add_dataclass_args
    from ..methods import METHODS, get_method

    p.add_argument("--method", choices=sorted(METHODS), help="sharing method (not needed with --plan)")
    p.add_argument("--plan", help="plan JSON file from `attnshare plan` (one plan or a list applied in order)")
    for method in sorted(METHODS):
        add_dataclass_args(p, get_method(method).config_cls)


def plans_from_args(args, model) -> list:
    """The plans named by ``--plan``, or made by ``--method``'s planner from its flags."""
    from ..config import dataclass_from_args
    from ..errors import AttnshareError
    from ..methods import get_method
    from ..plan import load_plans

    if args.plan:
        return load_plans(args.plan)
    if not args.method:
        raise AttnshareError("Give --method NAME (with its options) or --plan FILE.")
    method = get_method(args.method)
    return [method.make_plan(model, dataclass_from_args(method.config_cls, args))]


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """A GitHub-flavoured markdown table of ``rows``."""
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def write_json(path: str | Path | None, payload: dict) -> None:
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        print(f"wrote {path}")
