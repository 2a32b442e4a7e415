"""Render docs/exposure-raw.json (written by scripts/exposure.py) into docs/exposure.md and its figures.

Run: .venv/bin/python scripts/exposure_table.py [--raw FILE] [--doc FILE] [--figures DIR] [--readme FILE]

The tables replace what lies between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` in the
document and README.md's short ladder (the prose around them is kept); the figures are
``exposure-ladder.png``, ``exposure-zo-curves.png`` and ``exposure-audit.png``. Reads only the JSON; seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from graytune.audit import combine

AUDIT_VERSION = 2  # scripts/exposure.py's: the audits with issue 32's attacks

SIZE, DPI = (6.4, 4.0), 100
LEVELS = ("black-box", "dark-gray", "light-gray", "white-box")
COLOURS = {"black-box": "#222222", "dark-gray": "#1f77b4", "light-gray": "#2ca02c", "white-box": "#d62728"}
ESTIMATORS = {"spsa": "SPSA", "spsa-gc": "SPSA-GC (BlackVIP)", "zip": "ZIP (intrinsic, clipped)"}
TITLES = {"text": "MiniLM, WordNet gloss → supersense (accuracy)",
          "image-text": "bridge, Tux Paint drawing ↔ caption retrieval at 128 px (mean recall: R@1, 5, 10 both ways)"}
HIDDEN_PORTS = ("input_ids", "attention_mask")  # what every call sends; not an exposure of its own


def pct(values: list[float]) -> str:
    values = [100.0 * v for v in values]
    return f"{values[0]:.1f}" if len(values) == 1 else \
        f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def seeds_word(n: int) -> str:
    return f"{n} seed{'s' * (n > 1)}"


def mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def grouped(rows: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        out[tuple(row[k] for k in keys)].append(row)
    return out


def ports(exposure: dict[str, Any]) -> str:
    """The ports a run touched beyond the plain inputs, with the ops used and the widths revealed; entry
    layers with the same ops and width are one cell (``text.layer.1–5``)."""
    cells: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    def natural(port: str) -> list[Any]:
        return [int(part) if part.isdigit() else part for part in port.split(".")]

    for port, ops in sorted(exposure["ports"].items(), key=lambda item: natural(item[0])):
        if port.endswith(HIDDEN_PORTS):
            continue
        width = [d for d in exposure["dims"].get(port, []) if isinstance(d, int)]
        layer = re.fullmatch(r"(.+\.layer)\.(\d+)", port)
        name, index = (layer.group(1), layer.group(2)) if layer else (port, "")
        cells[(name, "/".join(ops), "×".join(map(str, width)))].append(index)
    out = []
    for (name, ops, width), indices in cells.items():
        if indices != [""]:
            numbers = sorted(int(i) for i in indices)
            name += f".{numbers[0]}" if len(numbers) == 1 else f".{numbers[0]}–{numbers[-1]}"
        out.append(f"`{name}` {ops}" + (f" ({width})" if width else ""))
    return "; ".join(out) or "—"


def current(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The audits with issue 32's attacks (``version`` 2), each level's recommendation derived again from the stored
    curves by the rule as it is now (``graytune.audit.combine``); earlier rows stay in the raw file, unrendered."""
    audits = []
    for audit in raw["audits"]:
        if audit.get("version") == AUDIT_VERSION:
            audit = copy.deepcopy(audit)
            combine(audit["report"]["levels"], audit["report"]["rows_per_call"])
            audits.append(audit)
    return audits


def audit_at(raw: dict[str, Any], task: str, level: str, calls: int) -> str:
    """The best surrogate fidelity (probe accuracy as a share of the backbone's) among the attacks a client at
    ``level`` can run (its level's and those below), at ``calls`` or just below, over the task's audits with
    issue 32's attacks; a task with none of those reads the earlier audits', and says so."""
    if level == "white-box":
        return "1 (the module is handed over)"
    audits = [a for a in current(raw) if a["task"] == task]
    earlier = not audits
    if earlier:
        audits = [a for a in raw["audits"] if a["task"] == task and "version" not in a]
    last: dict[tuple[str, str], dict[str, Any]] = {}  # each attack's last checkpoint within the calls, any audit
    for audit in sorted(audits, key=lambda a: a["budget"]):
        for name, found in audit["report"]["levels"].items():
            if LEVELS.index(name) <= LEVELS.index(level):
                for mode, attack in attacks(name, found).items():
                    within = [c for c in attack["checkpoints"] if 0 < c["calls"] <= calls]
                    if within and within[-1]["calls"] >= last.get((name, mode), {"calls": 0})["calls"]:
                        last[(name, mode)] = within[-1]
    if not last:
        return "not audited"
    ratio, at, mode = max((c["probe_ratio"], c["calls"], mode) for (_, mode), c in last.items())
    budget = max(a["budget"] for a in audits)
    notes = [f"audit budget {budget:,}"] * (calls > budget) + ["earlier attacks"] * earlier
    return f"{ratio:.2f} at {at:,}, {mode}" + (f" ({'; '.join(notes)})" if notes else "")


def attacks(level: str, found: dict[str, Any]) -> dict[str, Any]:
    """A level's extraction curves by attack; an earlier audit held one curve per level (outputs at black-box,
    VJPs with one shared shift above)."""
    extraction = found["extraction"]
    if "checkpoints" in extraction:
        return {"outputs" if level == "black-box" else "vjp (shared shift)": extraction}
    return extraction


def edit_rows(run: dict[str, Any], task: str) -> str:
    """Rows a black-box run sent with edits at ``text.token_embeds`` and no gradient: its every text row (training,
    validation, test); paired retrieval sends as many captions as images, so half its rows."""
    edits = {"add", "insert"} & set(run["exposure"]["ports"].get("text.token_embeds", []))
    if run["access"] != "black-box" or not edits:
        return "0" if run["access"] == "black-box" else "—"
    return f"{run['exposure']['forward_samples'] // (2 if task == 'image-text' else 1):,}"


def ladder_table(raw: dict[str, Any], task: str) -> str:
    rows = [r for r in raw["ladder"] if r["task"] == task]
    if not rows:
        return "_not run yet_\n"
    primary = rows[0]["primary"]
    lines = ["| method | access | ports used (ops, widths revealed) | training calls | all forward calls | "
             f"VJP calls | VJP rows | black-box edit rows | test {primary} % | audit fidelity at these calls |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    by_method = grouped(rows, "method")
    for method in raw_order(by_method):
        runs = by_method[(method,)]
        first, access = runs[0], runs[0]["access"]
        forward, vjp, vjp_rows = (round(mean([r["exposure"].get(k, 0) for r in runs]))
                                  for k in ("forward_queries", "gradient_queries", "gradient_samples"))
        train = round(mean([r.get("calls", {}).get("train", 0) for r in runs]))
        used = ports(first["exposure"])
        counts = f"{train:,} | {forward:,} | {vjp:,} | {vjp_rows:,} | {edit_rows(first, task)}"
        if access == "white-box":  # the client runs its own copy: nothing crosses a boundary
            used, counts = "the module itself (its weights)", "— | — | — | — | —"
        seeds_note = "" if len(runs) == 3 else f" ({seeds_word(len(runs))})"
        lines.append(f"| {method} | {access} | {used} | {counts} | {pct([r['test'][primary] for r in runs])}"
                     f"{seeds_note} | {audit_at(raw, task, access, forward + vjp)} |")
    return "\n".join(lines) + "\n"


def readme_table(raw: dict[str, Any]) -> str:
    """The README's short ladder: both tasks' test metric per method, its level and what crossed the boundary."""
    by_task = {task: grouped([r for r in raw["ladder"] if r["task"] == task], "method") for task in TITLES}
    methods = raw_order({key: [] for rows in by_task.values() for key in rows})
    lines = ["| method | access | MiniLM WordNet accuracy % | bridge Tux Paint mean recall % | forward calls | "
             "VJP rows |", "|---|---|---:|---:|---:|---:|"]
    for method in methods:
        cells, access, forward, rows = [], "", "", ""
        for task, by in by_task.items():
            runs = by.get((method,), [])
            if not runs:
                cells.append("—")
                continue
            primary = runs[0]["primary"]
            cells.append(pct([r["test"][primary] for r in runs]))
            access = runs[0]["access"]
            if task == "text":
                counts = [round(mean([r["exposure"].get(k, 0) for r in runs]))
                          for k in ("forward_queries", "gradient_samples")]
                forward, rows = ("— (own copy)", "—") if access == "white-box" else (f"{counts[0]:,}", f"{counts[1]:,}")
        lines.append(f"| {method} | {access} | {cells[0]} | {cells[1]} | {forward} | {rows} |")
    return "\n".join(lines) + "\n"


def raw_order(by_method: dict[tuple, list]) -> list[str]:
    order = ["zero-shot", "output", "dga-zo", "prompt-zo", "dga", "lga", "lga-deep", "adalink", "lora", "full"]
    names = [m for (m,) in by_method]
    return [m for m in order if m in names] + [m for m in names if m not in order]


def targets_table(raw: dict[str, Any]) -> str:
    lines = ["| task | output (black-box, 60 steps) | output at dga-zo's steps (control) | dga-zo (black-box) | "
             "DGA (dark-gray) | gap closed | dga-zo calls / DGA calls | beats output (both)? | closes half the gap? | "
             "seeds |", "|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for task in TITLES:
        rows = [r for r in raw["ladder"] if r["task"] == task]
        by = grouped(rows, "method")
        if not all((m,) in by for m in ("output", "dga", "dga-zo")):
            continue
        primary = rows[0]["primary"]
        acc = {m: mean([r["test"][primary] for r in by[(m,)]]) for m in ("output", "dga", "dga-zo")}
        control = [r["test"][primary] for r in raw.get("controls", []) if r["task"] == task]
        control_cell = f"{pct(control)} ({seeds_word(len(control))})" if control else "not run"
        best_output = max(acc["output"], mean(control)) if control else acc["output"]
        gap = acc["dga"] - acc["output"]
        ratio = mean([r["calls"]["train"] for r in by[("dga-zo",)]]) / mean([r["calls"]["train"] for r in by[("dga",)]])
        if gap > 0:
            closed = (acc["dga-zo"] - acc["output"]) / gap
            closed_cell, half = f"{closed:.0%}", "yes" if closed >= 0.5 else "no"
        else:  # DGA did not beat output here: there is no gap to close
            closed_cell = "no gap (DGA ≤ output)"
            half = "moot: above both" if acc["dga-zo"] > acc["dga"] else "moot"
        seeds = min(len(by[(m,)]) for m in ("output", "dga", "dga-zo"))
        lines.append(f"| {task} | {100 * acc['output']:.1f} | {control_cell} | {100 * acc['dga-zo']:.1f} | "
                     f"{100 * acc['dga']:.1f} | {closed_cell} | {ratio:.0f}× | "
                     f"{'yes' if acc['dga-zo'] > best_output else 'no'} | {half} | {seeds} |")
    return "\n".join(lines) + "\n"


def zo_curves(raw: dict[str, Any]) -> dict[str, list[list[tuple[int, float]]]]:
    """Validation accuracy against training calls per estimator on the text task, one curve per seed."""
    curves: dict[str, list[list[tuple[int, float]]]] = defaultdict(list)
    for row in raw["ladder"]:
        if row["task"] == "text" and row["method"] in ("dga-zo", "dga"):
            curves[row["estimator"] or "dga"].append([tuple(p) for p in row["curve"]])
    for row in raw["curves"]:
        curves[row["estimator"]].append([tuple(p) for p in row["curve"]])
    return curves


def mean_curve(runs: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The seeds' mean at each number of calls all of them logged."""
    common = sorted(set.intersection(*(set(c for c, _ in run) for run in runs)))
    return [(c, mean([dict(run)[c] for run in runs])) for c in common]


def calls_to_table(raw: dict[str, Any]) -> str:
    """Calls to a common accuracy: the lowest of the estimators' best mean validation accuracies (as ZIP)."""
    curves = {k: mean_curve(v) for k, v in zo_curves(raw).items() if k in ESTIMATORS and v}
    if len(curves) < 2:
        return "_not run yet_\n"
    target = min(max(a for _, a in curve) for curve in curves.values())
    lines = [f"Common target: {100 * target:.1f} % validation accuracy (the lowest of the estimators' best mean "
             "accuracies).\n", "| estimator | seeds | best val % (mean) | calls to the target | test % |",
             "|---|---:|---:|---:|---:|"]
    tests = grouped([r for r in [*raw["ladder"], *raw["curves"]] if r["task"] == "text" and r["method"] == "dga-zo"],
                    "estimator")
    for name, curve in curves.items():
        hit = next(c for c, a in curve if a >= target)
        runs = tests[(name,)]
        lines.append(f"| {ESTIMATORS[name]} | {len(runs)} | {100 * max(a for _, a in curve):.1f} | {hit:,} | "
                     f"{pct([r['test']['accuracy'] for r in runs])} |")
    return "\n".join(lines) + "\n"


def rendered(lines: list[str]) -> str:
    return "\n".join(lines) + "\n" if len(lines) > 2 else "_not run yet_\n"


def audit_table(raw: dict[str, Any]) -> str:
    """Each attack of each audit at the end of its budget: fidelity, and what it spent in the server's units."""
    lines = ["| task (tower) | budget | level | attack | probe / backbone's | cosine | agreement | samples | VJP rows | "
             "edit rows | student (numbers) | seconds |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for audit, level, found in levels_of(raw):
        for mode, extraction in found["extraction"].items():
            last, report = extraction["checkpoints"][-1], audit["report"]
            lines.append(f"| {audit['task']} ({report['modality']}) | {audit['budget']:,} | {level} | {mode} | "
                         f"{last['probe_ratio']:.2f} | {last['cosine']:.2f} | {last['agreement']:.2f} | "
                         f"{last['samples']:,} | {last['grad_rows']:,} | {last['edit_rows']:,} | "
                         f"{extraction['student_parameters'] / 1e6:.1f} M | {report['seconds']:.0f} |")
    return rendered(lines)


def levels_of(raw: dict[str, Any]) -> list[tuple[dict[str, Any], str, dict[str, Any]]]:
    return [(a, level, found) for a in sorted(current(raw), key=lambda a: (a["task"], a["budget"]))
            for level, found in a["report"]["levels"].items()]


def quota_table(raw: dict[str, Any]) -> str:
    """Each level's recommendation in graytune serve's units, and the line saying why the levels differ; from the
    attacks that audit ran up to the level (an audit that left out the binding attack recommends more)."""
    lines = ["| task | budget | level | attacks up to the level | --quota-samples | --quota-grad-rows | "
             "--black-box-edits | why |", "|---|---:|---|---|---:|---:|---|---|"]
    for audit, level, found in levels_of(raw):
        quota = found["recommended_quota"]
        samples, grad, edits = quota["flags"].values()
        zeroth_order = quota["edits"].get("for_zeroth_order_keys")
        edits = f"{edits} ({zeroth_order} where a key trains zeroth-order)" if edits else "—"
        ran = ", ".join(mode for name, lower in audit["report"]["levels"].items()
                        if LEVELS.index(name) <= LEVELS.index(level) for mode in lower["extraction"])
        lines.append(f"| {audit['task']} | {audit['budget']:,} | {level} | {ran} | "
                     f"{'not measurable' if samples is None else f'{samples:,}'} | "
                     f"{'—' if grad is None else f'{grad:,}'} | {edits} | {quota['why']} |")
    return rendered(lines)


def jacobian_table(raw: dict[str, Any]) -> str:
    """The whole Jacobians a level hands over: by finite differences (black-box), by duplicate rows (dark-gray)."""
    lines = ["| task (tower) | budget | level | attack | status | Jacobian shape | calls | samples (edit rows) | VJP "
             "rows | relative error | geometry (row corr.) |", "|---|---:|---|---|---|---|---:|---:|---:|---:|---:|"]
    for audit, level, found in levels_of(raw):
        geometry = found.get("embedding_geometry", {}).get("pairwise_cosine_correlation")
        geometry = "—" if geometry is None else f"{geometry:.2f}"
        for name, part in [(n, found[n]) for n in ("finite_differences", "duplicate_rows") if "spent" in found.get(n, {})]:
            spent, error = part["spent"], part.get("relative_error", part.get("finite_difference_error"))
            shape = "×".join(map(str, part.get("jacobian_shape", []))) or "—"
            lines.append(f"| {audit['task']} ({audit['report']['modality']}) | {audit['budget']:,} | {level} | "
                         f"{name.replace('_', ' ')} | {part['status']} | {shape} | {spent['calls']} | "
                         f"{spent['samples']:,} ({spent['edit_rows']:,}) | {spent['grad_rows']:,} | "
                         f"{'—' if error is None else f'{error:.1e}'} | {geometry} |")
    return rendered(lines)


def ladder_figure(raw: dict[str, Any], path: Path) -> None:
    fig = Figure(figsize=(SIZE[0] * 2, SIZE[1]), dpi=DPI)
    for i, task in enumerate(TITLES):
        ax = fig.add_subplot(1, 2, i + 1)
        rows = [r for r in raw["ladder"] if r["task"] == task]
        for (method,), runs in grouped(rows, "method").items():
            primary = runs[0]["primary"]
            calls = mean([r["exposure"]["forward_queries"] + r["exposure"]["gradient_queries"] for r in runs])
            acc = [100 * r["test"][primary] for r in runs]
            err = statistics.stdev(acc) if len(acc) > 1 else 0.0
            if runs[0]["access"] == "white-box":  # no boundary call: a line at its accuracy, not a point
                ax.axhline(mean(acc), color=COLOURS["white-box"], ls=":", lw=1)
                ax.annotate(f"{method} (white-box, no boundary)", (0.01, mean(acc)), xycoords=("axes fraction", "data"),
                            textcoords="offset points", xytext=(0, 3), fontsize=7, color=COLOURS["white-box"])
                continue
            ax.errorbar(calls, mean(acc), yerr=err, fmt="o", color=COLOURS[runs[0]["access"]])
            ax.annotate(method, (calls, mean(acc)), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("boundary calls of the run (forward + VJP, validation and test included)")
        ax.set_ylabel("test %")
        ax.set_title(TITLES[task], fontsize=8)
        for level, colour in COLOURS.items():
            ax.plot([], [], "o", color=colour, label=level)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def curves_figure(raw: dict[str, Any], path: Path) -> None:
    fig = Figure(figsize=SIZE, dpi=DPI)
    ax = fig.add_subplot()
    for name, runs in zo_curves(raw).items():
        curve = mean_curve(runs)
        if not curve:
            continue
        label = ESTIMATORS.get(name, "DGA (dark-gray, VJPs)") + f", {seeds_word(len(runs))}"
        ax.plot([c for c, _ in curve], [100 * a for _, a in curve], marker=".", label=label)
    output = [r for r in raw["ladder"] if r["task"] == "text" and r["method"] == "output"]
    if output:
        ax.axhline(100 * mean([r["best_val"] for r in output]), color="0.5", ls="--", lw=1,
                   label="output adapters only (black-box), best val")
    ax.set_xlabel("training calls (one batched forward = one call)")
    ax.set_ylabel("validation accuracy %")
    ax.set_title("MiniLM WordNet supersenses: dga-zo by estimator vs DGA", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def audit_figure(raw: dict[str, Any], path: Path) -> None:
    tasks = sorted({a["task"] for a in current(raw)})
    fig = Figure(figsize=(SIZE[0] * max(len(tasks), 1), SIZE[1]), dpi=DPI)
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        titles = set()
        for level in LEVELS[:-1]:
            curves: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}  # each attack from its largest audit
            for audit in sorted(current(raw), key=lambda a: a["budget"]):
                if audit["task"] == task and level in audit["report"]["levels"]:
                    titles.add(f"{audit['backbone']} ({audit['report']['modality']} tower)")
                    for mode, extraction in audit["report"]["levels"][level]["extraction"].items():
                        curves[mode] = (audit, extraction)
            for mode, (audit, extraction) in curves.items():
                points = [c for c in extraction["checkpoints"] if c["calls"] > 0]
                ax.plot([c["calls"] for c in points], [c["probe_ratio"] for c in points], marker=".",
                        color=COLOURS[level], label=f"{level}: {mode} (budget {audit['budget']:,})",
                        ls={"differences": "--", "vjp": "-"}.get(mode, ":" if level == "black-box" else "-"))
        ax.axhline(0.9, color="0.5", ls="--", lw=1, label="90 % of the backbone's probe")
        ax.set_xscale("log")
        ax.set_xlabel("attack calls (16 rows each)")
        ax.set_ylabel("surrogate probe accuracy / backbone's")
        ax.set_title(", ".join(sorted(titles)), fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def replace(doc: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- /generated:{name} -->)", re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{name}: no <!-- generated:{name} --> ... <!-- /generated:{name} --> block in the document")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", default="docs/exposure-raw.json")
    parser.add_argument("--doc", default="docs/exposure.md")
    parser.add_argument("--figures", default="docs/figures")
    parser.add_argument("--readme", default="README.md", help="its ladder block is rewritten too ('' : leave it)")
    args = parser.parse_args()
    raw = json.loads(Path(args.raw).read_text())
    doc_path = Path(args.doc)
    doc = doc_path.read_text()
    tables = {**{f"ladder-{task}": ladder_table(raw, task) for task in TITLES}, "targets": targets_table(raw),
              "calls-to-accuracy": calls_to_table(raw), "audits": audit_table(raw),
              "audit-quotas": quota_table(raw), "audit-jacobians": jacobian_table(raw)}
    for name, table in tables.items():
        doc = replace(doc, name, table)
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    for draw, name in ((ladder_figure, "ladder"), (curves_figure, "zo-curves"), (audit_figure, "audit")):
        draw(raw, figures / f"exposure-{name}.png")
    written = {doc_path: doc}
    if args.readme:
        readme = Path(args.readme)
        written[readme] = replace(readme.read_text(), "ladder-readme", readme_table(raw))
    for path, text in written.items():
        path.with_suffix(".tmp").write_text(text)
        path.with_suffix(".tmp").replace(path)


if __name__ == "__main__":
    main()
