"""attnshare fetch-data: download the text corpus and convert the embedded model into the cache."""

from __future__ import annotations


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="download the corpus and prepare the embedded model (once)")
    p.add_argument("--force", action="store_true", help="download the corpus again")
    p.add_argument("--no-model", action="store_true", help="skip converting the embedded model")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..data import fetch_corpus
    from ..models.loading import EMBEDDED, embedded_path

    print(f"corpus: {fetch_corpus(force=args.force)}")
    if not args.no_model:
        for name in EMBEDDED:
            print(f"model {name}: {embedded_path(name)}")
    return 0
