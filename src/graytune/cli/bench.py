"""``graytune bench``: boundary overhead and memory, measured side by side in one run."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="boundary vs plain autograd, memory vs full fine-tuning, remote vs in-process")
    p.add_argument("--rounds", type=int, default=12, help="timed steps per path, interleaved (default: 12)")
    p.add_argument("--cases", default="minilm,efficientnet-lite0", help="comma-separated boundary cases")
    p.add_argument("--transmiter", action=argparse.BooleanOptionalAction, default=True,
                   help="also time TransMiter's transfer and adapted inference (default: on)")
    p.add_argument("--serve", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the served boundary: remote vs in-process, transport, mixed adapters "
                        "(default: on)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from graytune.bench.boundary import format_report, run_benchmarks

    results = run_benchmarks(args.cases.split(","), rounds=args.rounds)
    if args.transmiter:
        from graytune.bench import transmiter

        results["transmiter"] = transmiter.run()
    if args.serve:
        from graytune.bench import serve

        results["serve"] = serve.run(rounds=args.rounds)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_report(results))
        if args.transmiter:
            print("\n" + transmiter.format_report(results["transmiter"]))
        if args.serve:
            print("\n" + serve.format_report(results["serve"]))
    return 0
