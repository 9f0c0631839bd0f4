"""The ``attnshare`` command line: one module per subcommand, each with ``add_parser(sub)`` and ``run(args)``.

Bad input (an :class:`~attnshare.errors.AttnshareError`, or flags argparse refuses) is printed as one line,
``error: <sentence>``, on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import typing

# subcommand -> module (imported only when used, so `attnshare --help` stays fast)
COMMANDS: dict[str, str] = {  # in workflow order (the order --help lists them)
    "analyze": "attnshare.cli.analyze",
    "plan": "attnshare.cli.plan",
    "apply": "attnshare.cli.apply",
    "train": "attnshare.cli.train",
    "sweep": "attnshare.cli.sweep",
    "compare": "attnshare.cli.compare",
    "eval": "attnshare.cli.eval_cmd",
    "bench": "attnshare.cli.bench",
    "generate": "attnshare.cli.generate",
    "demo": "attnshare.cli.demo",
    "fetch-data": "attnshare.cli.fetch_data",
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...; see `attnshare CMD --help`.``) instead of the full usage block."""

    def error(self, message: str) -> typing.NoReturn:
        message = message.rstrip(".")
        self.exit(2, f"error: {message}; see `{self.prog} --help`.\n")


def version_lines() -> list[str]:
    """attnshare, torch and transformers versions, each with the range CI tests and whether it lies inside it."""
    from ..hf_compat import declared_ranges, untested_packages, versions

    have, ranges = versions(), declared_ranges()
    outside = {line.split()[0] for line in untested_packages()}
    lines = [f"attnshare {have['attnshare']}"]
    for name in ("torch", "transformers"):
        verdict = "UNTESTED: outside the tested range" if name in outside else "in the tested range"
        lines.append(f"{name} {have[name]} ({verdict} {ranges.get(name, 'undeclared')})")
    return lines


class VersionAction(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(0, "\n".join(version_lines()) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="attnshare",
        description="Share attention across layers and heads of pretrained language models (SA, LiSA, "
        "DirectShare, PostShare): analyze, plan, apply, train, evaluate, benchmark.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action=VersionAction,
                        help="print the versions of attnshare, torch and transformers and whether they are tested")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(sub, name)
    for command in sub.choices.values():  # every command takes it; train's and bench's configs read it too
        if "--progress" not in command._option_string_actions:
            command.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                                 help="show progress bars (default: True)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..errors import AttnshareError
    from ..progress import show_progress

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a flag argparse refused (2, message already printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress = getattr(args, "progress", True)
    show_progress(progress)  # --no-progress: no bar anywhere in the process, transformers' included
    if not progress:
        from ..hf_compat import hide_hf_progress_bars

        hide_hf_progress_bars()
    if getattr(args, "keep_freed_memory", True):
        from ..allocator import keep_freed_memory

        keep_freed_memory()  # large temporaries reuse freed memory instead of page-faulting in afresh
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
