"""``graytune plot RUN...``: training loss and validation curves of one or several runs, as an image."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw training loss and validation curves of runs (history.jsonl) to a PNG",
                       description="Draw loss (left) and a validation metric (right) against step, one line per "
                                   "run, from the history.jsonl that graytune train --out DIR writes into DIR.")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="a run or artifact folder (graytune train --out DIR), or a history.jsonl file")
    p.add_argument("--out", default="plot.png",
                   help="image to write: .png, .svg or .pdf (default: plot.png in the current folder)")
    p.add_argument("--metric", default=None,
                   help="validation metric to draw (default: the one the runs selected on, e.g. mean_recall)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print what was drawn as one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from graytune.eval.plots import drawn_metric, plot_histories, read_history, without_metric

    runs = [read_history(r) for r in args.runs]
    out = plot_histories(runs, args.out, metric=args.metric, overwrite=args.overwrite)
    summary = [{"run": str(r.path), "steps": len(r.steps), "validations": len(r.val_steps),
                "last_step": max(r.steps + r.val_steps), "best_step": r.best_step} for r in runs]
    metric = drawn_metric(runs, args.metric)
    missing = [str(r.path) for r in without_metric(runs, metric)]
    if args.json:
        print(json.dumps({"out": str(out), "runs": summary, "metric": metric, "not_drawn": missing}, sort_keys=True))
        return 0
    for run in missing:
        print(f"note: {run} has no {metric} in its validations: its validation curve is not drawn (choose another "
              "with --metric)")
    print(f"wrote {out}")
    for row in summary:
        best = f", best at step {row['best_step']}" if row["best_step"] is not None else ""
        print(f"  {row['run']}: {row['steps']} steps logged, {row['validations']} validations{best}")
    return 0
