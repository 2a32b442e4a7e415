"""``graytune bench``: boundary overhead and memory, measured side by side in one run."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="boundary vs plain autograd step time, adapter vs full fine-tuning memory")
    p.add_argument("--rounds", type=int, default=12, help="timed steps per path, interleaved (default: 12)")
    p.add_argument("--cases", default="minilm,efficientnet-lite0", help="comma-separated cases")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from graytune.bench.boundary import format_report, run_benchmarks

    results = run_benchmarks(args.cases.split(","), rounds=args.rounds)
    print(json.dumps(results, indent=2) if args.json else format_report(results))
    return 0
