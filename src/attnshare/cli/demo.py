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
    from types import SimpleNamespace

    from ..config import dataclass_from_args
    from ..errors import AttnshareError
    from ..report.demo import DemoConfig, run_demo, write_report
    from .common import check_model_args, check_out_folder, check_text

    config = dataclass_from_args(DemoConfig, args)  # bad flags, texts and outputs fail before the slow model load
    check_model_args(SimpleNamespace(model=config.model, num_layers=None))
    check_text(config.text)
    out = check_out_folder(config.out)
    existed = out.exists()
    try:
        report = run_demo(config)
    except AttnshareError:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # bad input found by the demo itself leaves no empty report folder behind
        raise
    print(write_report(report).read_text())
    print(f"report: {report.out / 'report.md'}")
    return 0
