"""The language-model table of docs/results.md from docs/lm-raw.json (written by scripts/lm_study.py).

Run: .venv/bin/python scripts/lm_table.py [--raw docs/lm-raw.json]   (markdown on stdout)

Per task and method: the access level, trainable numbers, the learning rate chosen on validation (seed 0;
"edge" when it is the lowest or highest rate run, "registry only" before the grid ran), test exact match and
per-token NLL as mean ± standard deviation over the seeds run at that rate (n given), and per run the forward
calls (training, validation) and the VJP rows the boundary answered in training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_kit import pick_lr  # noqa: E402  (beside this script)

ORDER = ("zero-shot", "prompt-zo", "prompt", "dga", "adalink", "lga", "lga-deep", "lora", "full")


def chosen_rows(runs: list[dict[str, Any]], task: str, method: str) -> tuple[list[dict[str, Any]], str]:
    """The runs at the rate chosen on seed 0's validation, and a note on that choice."""
    mine = [r for r in runs if r["task"] == task and r["method"] == method]
    if not mine:
        return [], ""
    if mine[0]["lr"] is None:
        return mine, ""
    best = {r["lr"]: r["best_val"] for r in mine if r["seed"] == 0}
    registry = _registry(method)
    lr, edge = pick_lr(best, registry)
    note = "registry only" if len(best) == 1 else (f"{edge} edge" if edge else "")
    return [r for r in mine if r["lr"] == lr], note


def _registry(method: str) -> float:
    from graytune.methods import get_method

    return float(get_method(method).lr or 0.0)


def _spread(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def table(data: dict[str, Any], task: str) -> str:
    runs = data["runs"]
    lines = [f"**{task}** ({data['protocol']['backbone']}, Q4-quantised; {data['protocol']['steps']} steps of batch "
             f"{data['protocol']['batch_size']}; validation on {data['protocol']['val_size']} items, test on "
             f"{data['protocol']['test_size']})", "",
             "| method | access | trainable | lr | test exact match % | test NLL / token | n | train calls | "
             "VJP rows |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for method in ORDER:
        rows, note = chosen_rows(runs, task, method)
        if not rows:
            continue
        first = rows[0]
        lr = "–" if first["lr"] is None else f"{first['lr']:g}" + (f" ({note})" if note else "")
        em = _spread([r["test"]["exact_match"] for r in rows])
        nll = _spread([r["test"]["nll"] for r in rows], scale=1.0, digits=2)
        name = method + (f" ({first['estimator']})" if first.get("estimator") else "")
        lines.append(f"| {name} | {first['access']} | {first['trainable_parameters']:,} | {lr} | {em} | {nll} | "
                     f"{len(rows)} | {first['calls'].get('train', 0):,} | {first['vjp_rows']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", default="docs/lm-raw.json")
    args = parser.parse_args(argv)
    data = json.loads(Path(args.raw).read_text())
    tasks = list(dict.fromkeys(r["task"] for r in data["runs"]))
    print("\n\n".join(table(data, task) for task in tasks))


if __name__ == "__main__":
    main()
