"""attnshare demo: the whole workflow on the embedded model, written as a report folder."""

from __future__ import annotations


def add_parser(sub, name: str) -> None:
    from ..config import add_dataclass_args
    from ..report.demo import DemoConfig

    p = sub.add_parser(name, help="run analyze -> plan -> apply/train -> eval -> bench and write a report",
                       epilog="example: attnshare demo --out report")
    add_dataclass_args(p, DemoConfig)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..config import dataclass_from_args
    from ..report.demo import DemoConfig, run_demo, write_report

    report = run_demo(dataclass_from_args(DemoConfig, args))
    print(write_report(report).read_text())
    print(f"report: {report.out / 'report.md'}")
    return 0
