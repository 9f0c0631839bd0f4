"""The ``attnshare`` command line: one module per subcommand, each with ``add_parser(sub)`` and ``run(args)``.

Bad input (an :class:`~attnshare.errors.AttnshareError`) is printed as one sentence, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> module (imported only when used, so `attnshare --help` stays fast)
COMMANDS: dict[str, str] = {  # in workflow order (the order --help lists them)
    "analyze": "attnshare.cli.analyze",
    "plan": "attnshare.cli.plan",
    "apply": "attnshare.cli.apply",
    "train": "attnshare.cli.train",
    "sweep": "attnshare.cli.sweep",
    "eval": "attnshare.cli.eval_cmd",
    "bench": "attnshare.cli.bench",
    "generate": "attnshare.cli.generate",
    "demo": "attnshare.cli.demo",
    "fetch-data": "attnshare.cli.fetch_data",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnshare",
        description="Share attention across layers and heads of pretrained language models (SA, LiSA, "
        "DirectShare, PostShare): analyze, plan, apply, train, evaluate, benchmark.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..errors import AttnshareError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except AttnshareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
