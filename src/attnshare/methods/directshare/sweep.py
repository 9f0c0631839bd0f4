"""Measurement harness: DirectShare perplexity for ratios x selection rules x match functions on one model.

``python -m attnshare.methods.directshare.sweep --ratios 0.1 0.3 --selects cosine loss --json out/ds-sweep.json``

Each row equals ``attnshare apply --method directshare --ratio R --select S --match M --eval`` (same plan, same
SPEC §6 perplexity protocol); the model is loaded and the base measured once, the loss planner measures once for all
ratios, and every plan is undone before the next.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ...analysis.weights import MATCH_FUNCTIONS
from ...evaluate.perplexity import PerplexityConfig, perplexity
from ...models.loading import load_model
from ...sharing.apply import apply, unapply
from .config import SELECT_RULES, DirectShareConfig
from .method import DirectShare
from .plan import GRANULARITIES, NORM_RULES
from .planner import best_matches, match_statistics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    p.add_argument("--matches", nargs="+", default=list(MATCH_FUNCTIONS))
    p.add_argument("--selects", nargs="+", default=["cosine"], choices=list(SELECT_RULES))
    p.add_argument("--granularities", nargs="+", default=["group"], choices=list(GRANULARITIES))
    p.add_argument("--norms", nargs="+", default=[DirectShareConfig.norms], choices=list(NORM_RULES))
    p.add_argument("--loss-tokens", type=int, default=DirectShareConfig.loss_tokens)
    p.add_argument("--share-o", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=16384, help="perplexity protocol: first N tokens of the text")
    p.add_argument("--base-from", help="reuse the base perplexity of an earlier results file (same protocol)")
    p.add_argument("--json", required=True, help="results file, rewritten after every row")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    protocol = PerplexityConfig(max_tokens=args.max_tokens)
    model, tok = load_model(args.model)
    if args.base_from:
        base = json.loads(Path(args.base_from).read_text())["base"]
        if base["tokens"] != protocol.max_tokens - protocol.max_tokens // protocol.window:
            raise SystemExit(f"{args.base_from} was measured under another protocol")
    else:
        base = perplexity(model, tok, protocol, progress=False).to_dict()
    out = {"model": args.model, "base": base, "stats": {}, "rows": []}
    params = model.num_parameters()
    print(f"base ppl {out['base']['ppl']:.3f}", flush=True)
    method = DirectShare()
    for match in args.matches:
        out["stats"][match] = match_statistics(best_matches(model, match))
        for select, granularity, norms in [(s, g, n) for s in args.selects for g in args.granularities
                                           for n in args.norms if not (s == "cosine" and g == "split")]:
            configs = [DirectShareConfig(ratio=ratio, match=match, select=select, share_o=args.share_o,
                                         granularity=granularity, loss_tokens=args.loss_tokens, norms=norms)
                       for ratio in args.ratios]
            start = time.perf_counter()
            plans = method.make_plans(model, configs)
            planning = time.perf_counter() - start
            print(f"planned {match}/{select}/{granularity}/{norms} norms in {planning:.0f} s", flush=True)
            for ratio, plan in zip(args.ratios, plans):
                apply(model, plan, keep_originals=True)
                start = time.perf_counter()
                ppl = perplexity(model, tok, protocol, progress=False)
                row = {"match": match, "select": select, "ratio": ratio, "share_o": args.share_o,
                       "granularity": plan.granularity, "norms": norms, "units": plan.num_pairs,
                       "borrowed norms": (plan.reached or {}).get("norms", 0),
                       "params saved": params - model.num_parameters(), "ppl": ppl.ppl,
                       "ppl ratio": ppl.ppl / out["base"]["ppl"], "planning seconds (all ratios)": planning,
                       "seconds": time.perf_counter() - start, "pairs": [list(pair) for pair in plan.pairs],
                       "q_pairs": [list(pair) for pair in plan.q_pairs]}
                unapply(model)
                out["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "pairs"}), flush=True)
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
