"""Render docs/converged-raw.json (written by scripts/converged.py): the converged tables beside the
equal-small-budget ones of docs/results-raw.json, the base-to-novel table, and one accuracy-vs-steps PNG per task.

Run: .venv/bin/python scripts/converged_table.py [--raw docs/converged-raw.json] [--small docs/results-raw.json]
     [--figures docs/figures] > docs/converged-tables.md

Markdown goes to stdout; figures are written as ``converged-<task>.png``. Reads only the JSON files; seconds.
The chosen rate is recomputed from the raw runs with the same rule as the study (``study_kit.pick_lr``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_kit import BRIDGE, TASKS, pick_lr, plateau  # noqa: E402  (the kit beside this script)

COLUMNS = {  # task -> (test metric key, column) ; the first is the primary
    "text": [("accuracy", "accuracy %")],
    "image": [("accuracy", "accuracy %")],
    "image-text": [("mean_recall", "mean R %"), ("text_retrieval_recall@1", "i→t R@1 %"),
                   ("image_retrieval_recall@1", "t→i R@1 %")],
    "sketch": [("mAP", "mAP %"), ("P@10", "P@10 %")],
}
B2N_COLUMNS = [("base_accuracy", "base %"), ("novel_accuracy", "novel %"), ("harmonic_mean", "HM %"),
               ("accuracy", "all 10 classes %")]
NATURE = {"minilm": "MiniLM: a contrastively trained sentence encoder",  # backbone -> what its table must say
          BRIDGE: "bridge: not contrastively trained"}
TITLES = {
    "text": "Text: MiniLM, WordNet gloss → supersense (10 classes; 2,000 train, 500 val, 3,000 test)",
    "image": "Image: the EfficientNet-Lite0 + MiniLM bridge, Fashion-MNIST at 64 px (1,000 / 500 / 1,000)",
    "image-text": "Image–text: the bridge on Tux Paint drawing ↔ caption retrieval at 128 px (500 / 85 / 200)",
    "sketch": "Sketch → drawing: the bridge on Tux Paint edge maps vs drawings, 96 px (500 / 85 / 200)",
    "text-b2n": "Text base-to-novel: MiniLM, WordNet supersenses, 5 base / 5 novel classes",
    "image-b2n": "Image base-to-novel: the bridge, Fashion-MNIST 64 px, 5 base / 5 novel classes",
}


def title(task: str) -> str:
    """A task's title, naming its backbone's nature (taken from the task's backbone, so no task can omit it)."""
    return f"{TITLES.get(task, task)}; {NATURE[TASKS[task].backbone]}"
SIZE, DPI = (6.4, 4.0), 100


def registry_lr(method: str) -> float | None:
    from graytune.methods import get_method

    return get_method(method).lr


def summarise(runs: list[dict[str, Any]], tol: float) -> dict[str, dict[str, Any]]:
    """Per method of one task: the rates tried (seed-0 best validation), the chosen rate and edge, the runs at
    it (all seeds), and the plateau of the seed-0 curve at it."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_method[run["method"]].append(run)
    seed0 = min(r["seed"] for r in runs)
    out = {}
    for method, rows in by_method.items():
        grid = {r["lr"]: r["best_val"] for r in rows if r["seed"] == seed0 and r["lr"] is not None}
        if grid:
            lr, edge = pick_lr(grid, registry_lr(method) or next(iter(grid)))
        else:
            lr, edge = None, ""
        chosen = sorted((r for r in rows if r["lr"] == lr), key=lambda r: r["seed"])
        first = next((r for r in chosen if r["seed"] == seed0), chosen[0])
        curve = [(s, v) for s, v, *_ in first["curve"]]
        out[method] = {"lr": lr, "edge": edge, "grid": grid, "runs": chosen, "curve": curve,
                       "plateau": plateau(curve, tol), "access": first["access"],
                       "params": first["trainable_parameters"]}
    return out


def fmt(values: list[float]) -> str:
    """Mean ± std over seeds, as percentages (the raw JSON holds 0–1)."""
    values = [100.0 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def grid_cell(grid: dict[float, float], chosen: float | None) -> str:
    return " · ".join(f"{'**' if lr == chosen else ''}{lr:g}: {100 * v:.1f}{'**' if lr == chosen else ''}"
                      for lr, v in sorted(grid.items())) or "–"


def plateau_cell(summary: dict[str, Any]) -> str:
    if not summary["curve"]:
        return "–"
    p = summary["plateau"]
    return f"still rising (best at {p['step']})" if p["rising"] else f"{p['step']}"


def lr_cell(summary: dict[str, Any]) -> str:
    """The chosen rate; "grid unfinished" while fewer than the study's 3 rates have run (a partial raw file)."""
    if summary["lr"] is None:
        return "–"
    notes = []
    if summary["edge"]:
        notes.append(f"{summary['edge']} edge")
    if len(summary["grid"]) < 3:
        notes.append("grid unfinished")
    return f"{summary['lr']:g}" + (f" ({', '.join(notes)})" if notes else "")


def seeds_cell(summary: dict[str, Any]) -> str:
    """How many seeds the cells average (fewer than asked while the study is under way)."""
    return str(len(summary["runs"])) if summary["lr"] is not None else "–"


def small_budget(small: dict[str, Any] | None, setting: str | None) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in (small or {}).get("rows", []):
        if row["setting"] == setting:
            rows[row["method"]].append(row)
    return rows


def converged_table(task: str, summaries: dict[str, dict[str, Any]], small: dict[str, Any] | None,
                    protocol: dict[str, Any]) -> list[str]:
    cols = COLUMNS.get(task, [("accuracy", "accuracy %")])
    primary, primary_label = cols[0]
    before = small_budget(small, TASKS[task].results)
    steps_small = (small or {}).get("steps", "?")
    lines = [f"### {title(task)}", "",
             f"Converged: rate chosen on validation (seed 0), then seeds {seeds_of(summaries)} at it, "
             f"{protocol['steps']} steps of batch {protocol['batch_size']}, test at the best validation. "
             f"Beside it, docs/results.md's equal small budget ({steps_small} steps at the registry's rate). "
             f"Plateau: first validation within {100 * protocol['plateau_tol']:g} points of the run's best.", "",
             "| method | access | trainable params | rates tried: val % (chosen in bold) | lr | seeds | "
             + " | ".join(f"{c} converged" if i == 0 else c for i, (_, c) in enumerate(cols))
             + f" | {primary_label} at {steps_small} steps | best-val step | plateau step |",
             "|---|---|---:|---|---:|---:|" + "---:|" * len(cols) + "---:|---:|---:|"]
    for method, s in summaries.items():
        cells = [fmt([r["test"][key] for r in s["runs"]]) for key, _ in cols]
        was = before.get(method)
        small_cell = fmt([r["test"][primary] for r in was]) if was else "–"
        best_steps = [r["best_step"] for r in s["runs"]]
        best_cell = f"{statistics.median(best_steps):.0f}" if s["curve"] else "–"
        lines.append(f"| {method} | {s['access']} | {s['params']:,} | {grid_cell(s['grid'], s['lr'])} | {lr_cell(s)} | "
                     + f"{seeds_cell(s)} | " + " | ".join(cells) + f" | {small_cell} | {best_cell} | {plateau_cell(s)} |")
    return lines + [""]


def b2n_table(task: str, summaries: dict[str, dict[str, Any]], protocol: dict[str, Any]) -> list[str]:
    lines = [f"### {title(task)}", "",
             f"Train and validation hold base classes only (the rate is chosen on base samples, scored among all "
             f"classes); test: accuracy among the base classes on base samples, among the novel classes on novel "
             f"samples, their harmonic mean, and among all 10 classes. Seeds {seeds_of(summaries)}, "
             f"{protocol['steps']} steps of batch {protocol['batch_size']}.", "",
             "| method | access | rates tried: base val % (chosen in bold) | lr | seeds | "
             + " | ".join(c for _, c in B2N_COLUMNS)
             + " | best-val step | plateau step |",
             "|---|---|---|---:|---:|" + "---:|" * len(B2N_COLUMNS) + "---:|---:|"]
    for method, s in summaries.items():
        cells = [fmt([r["test"][key] for r in s["runs"] if key in r["test"]]) for key, _ in B2N_COLUMNS]
        best_cell = f"{statistics.median(r['best_step'] for r in s['runs']):.0f}" if s["curve"] else "–"
        lines.append(f"| {method} | {s['access']} | {grid_cell(s['grid'], s['lr'])} | {lr_cell(s)} | "
                     + f"{seeds_cell(s)} | " + " | ".join(cells)
                     + f" | {best_cell} | {plateau_cell(s)} |")
    return lines + [""]


def seeds_of(summaries: dict[str, dict[str, Any]]) -> str:
    seeds = sorted({r["seed"] for s in summaries.values() if s["lr"] is not None for r in s["runs"]})
    return ", ".join(map(str, seeds)) or "–"


def curves_figure(path: Path, task: str, summaries: dict[str, dict[str, Any]], primary: str,
                  batch_size: int) -> Path:
    """Validation metric against steps, seed 0 at each method's chosen rate; zero-shot as a dashed line."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    ax = figure.subplots()
    colours = iter(f"C{i}" for i in range(20))
    for method, s in summaries.items():
        if not s["curve"]:
            ax.axhline(100 * s["runs"][0]["best_val"], color="0.45", linestyle="--", linewidth=1,
                       label=f"{method} ({100 * s['runs'][0]['best_val']:.1f})")
            continue
        steps, values = zip(*s["curve"])
        colour = next(colours)
        style = ":" if s["access"] == "white-box" else "-"
        ax.plot(steps, [100 * v for v in values], style, color=colour, linewidth=1.2,
                label=f"{method} ({s['access']}, lr {s['lr']:g})")
        best = max(s["curve"], key=lambda sv: sv[1])
        ax.plot([best[0]], [100 * best[1]], "o", color=colour, markersize=4)
    ax.set_xlabel(f"optimizer step (batch {batch_size})")
    ax.set_ylabel(f"validation {primary} %", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower right", framealpha=0.9)
    note = "seed 0 at each method's chosen rate; dot: best validation (the state tested); dotted: white-box"
    wrapped = textwrap.fill(title(task), width=110)  # long titles would run off the figure
    ax.set_title(f"{wrapped}\n{note}", fontsize=7.5)
    figure.savefig(path, dpi=DPI, metadata={"Software": None})  # no version stamp: regenerating changes nothing
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", default="docs/converged-raw.json", help="written by scripts/converged.py")
    parser.add_argument("--small", default="docs/results-raw.json", help="the equal-small-budget rows")
    parser.add_argument("--figures", default="docs/figures", help="folder for converged-<task>.png")
    args = parser.parse_args(argv)
    raw = json.loads(Path(args.raw).read_text())
    small_path = Path(args.small)
    small = json.loads(small_path.read_text()) if small_path.is_file() else None
    protocol = raw["protocol"]
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in raw["runs"]:
        by_task[run["task"]].append(run)
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    hours = sum(r["seconds"] for r in raw["runs"]) / 3600
    print(f"{len(raw['runs'])} runs, {hours:.1f} h of compute in all; protocol: "
          + ", ".join(f"{k} {v}" for k, v in protocol.items()) + ".\n")
    written = []
    for task in TASKS:  # the study's order
        if task not in by_task:
            continue
        summaries = summarise(by_task[task], protocol["plateau_tol"])
        lines = (b2n_table(task, summaries, protocol) if task.endswith("-b2n")
                 else converged_table(task, summaries, small, protocol))
        print("\n".join(lines))
        primary = by_task[task][0]["primary"]
        written.append(curves_figure(figures / f"converged-{task}.png", task, summaries, primary,
                                     protocol["batch_size"]))
    for path in written:
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)", file=sys.stderr)


if __name__ == "__main__":
    main()
