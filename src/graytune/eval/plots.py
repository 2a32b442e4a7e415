"""Training curves from run folders: loss and validation metric against step, one line per run.

A run folder (``graytune train --out DIR``; an artifact folder is the same folder) holds
``history.jsonl``, one JSON object per line::

    {"event": "step", "step": 12, "loss": 1.93, "lr": 0.0029, ...}
    {"event": "val", "step": 20, "metrics": {"mean_recall": 0.41, ...}, "primary": "mean_recall", "best": true}

Other events are ignored; a resumed run may repeat steps, and the last line for a step wins.
matplotlib is imported only when drawing, through its object API (no pyplot, no global backend
change), so this works headless and leaves a notebook's backend alone.

Example:
    >>> runs = [read_history("runs/dga"), read_history("runs/lga")]
    >>> plot_histories(runs, "curves.png")                     # loss | primary validation metric
    PosixPath('curves.png')
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from graytune.errors import ArtifactError, InvalidInputError, UnknownNameError
from graytune.artifact_files import CONFIG_NAME
from graytune.runs import history_file, read_history_lines

log = logging.getLogger(__name__)

FIGURE_SIZE = (11.0, 4.2)
"""Inches at ``DPI``: a 1100 × 420 pixel image."""
DPI = 100
FORMATS = (".png", ".svg", ".pdf")


@dataclass
class RunHistory:
    """One run's curves, steps ascending, one value per step."""

    name: str
    """The label: the run folder's name."""
    path: Path
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val: list[dict[str, float]] = field(default_factory=list)
    """Validation metrics at each of ``val_steps``."""
    primary: str | None = None
    """The metric the run selected on (the last validation line's ``primary``)."""
    best_step: int | None = None
    """The step of the last validation flagged ``best`` (the adapter kept), if any."""
    method: str | None = None
    backbone: str | None = None

    def metric(self, name: str) -> tuple[list[int], list[float]]:
        """Steps and values of validation metric ``name`` where it was recorded."""
        pairs = [(s, float(m[name])) for s, m in zip(self.val_steps, self.val) if name in m]
        return [s for s, _ in pairs], [v for _, v in pairs]

    @property
    def metric_names(self) -> list[str]:
        return sorted({k for m in self.val for k in m})


def read_history(run: str | os.PathLike[str]) -> RunHistory:
    """The curves of a run folder (or of a ``history.jsonl`` path itself).

    Raises:
        ArtifactError: no ``history.jsonl``, a damaged line, or no step or validation line at all.
    """
    file = history_file(run)
    folder = file.parent
    steps: dict[int, float] = {}
    vals: dict[int, dict] = {}
    for record in read_history_lines(file):
        if not isinstance(record, dict) or "step" not in record:
            continue
        if record.get("event") == "step" and record.get("loss") is not None:
            steps[int(record["step"])] = float(record["loss"])
        elif record.get("event") == "val" and isinstance(record.get("metrics"), dict):
            vals[int(record["step"])] = record
    if not steps and not vals:
        raise ArtifactError(f"{file} holds no step or validation line; nothing to plot (has the run logged "
                            "its first step yet?)")
    history = RunHistory(folder.resolve().name, folder)
    history.steps = sorted(steps)
    history.loss = [steps[s] for s in history.steps]
    history.val_steps = sorted(vals)
    history.val = [{k: float(v) for k, v in vals[s]["metrics"].items() if _is_number(v)}
                   for s in history.val_steps]
    if vals:
        history.primary = vals[history.val_steps[-1]].get("primary")
        flagged = [s for s in history.val_steps if vals[s].get("best")]
        history.best_step = flagged[-1] if flagged else None
    history.method, history.backbone = _describe(folder)
    return history


def plot_histories(runs: list[RunHistory], out: str | os.PathLike[str], metric: str | None = None,
                   overwrite: bool = False) -> Path:
    """Draw loss (left) and validation ``metric`` (right; default: the runs' primary metric) against step.

    One line per run, labelled by its folder name; the kept (best) validation point is ringed.

    Raises:
        InvalidInputError: no runs, an existing ``out`` without ``overwrite``, an unsupported suffix.
        UnknownNameError: ``metric`` is in none of the runs.
    """
    if not runs:
        raise InvalidInputError("no runs to plot; give at least one run folder")
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise InvalidInputError(f"cannot write {out}: the file name must end in one of {', '.join(FORMATS)}")
    if out.exists() and not overwrite:
        raise InvalidInputError(f"{out} exists; choose another --out or pass --overwrite to replace it")
    metric = drawn_metric(runs, metric)
    if metric is not None and not any(metric in r.metric_names for r in runs):
        raise UnknownNameError("validation metric", metric, {m for r in runs for m in r.metric_names},
                               "choose one with --metric")
    figure = _draw(runs, metric)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI)
    return out


def drawn_metric(runs: list[RunHistory], metric: str | None = None) -> str | None:
    """The validation metric ``plot_histories`` draws: ``metric``, else the one the runs selected on."""
    return metric or _primary(runs)


def without_metric(runs: list[RunHistory], metric: str | None) -> list[RunHistory]:
    """The runs that have validation lines but none of ``metric`` (left out of the validation panel, and said)."""
    return [r for r in runs if metric is not None and r.val_steps and metric not in r.metric_names]


def _draw(runs: list[RunHistory], metric: str | None):  # -> matplotlib.figure.Figure
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
    loss_ax, val_ax = figure.subplots(1, 2)
    labels = _labels(runs)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for run, label, colour in zip(runs, labels, colours):
        if run.steps:
            loss_ax.plot(run.steps, run.loss, color=colour, label=label, linewidth=1.4,
                         marker="." if len(run.steps) < 30 else None)
    positive = [v for r in runs for v in r.loss if math.isfinite(v)]
    if positive and min(positive) > 0 and max(positive) / min(positive) > 50:
        loss_ax.set_yscale("log")
    loss_ax.set(title="training loss", xlabel="step", ylabel="loss")
    drawn, bests = False, []
    for run, label, colour in zip(runs, labels, colours):
        steps, values = run.metric(metric) if metric else ([], [])
        if not steps:
            continue
        drawn = True
        val_ax.plot(steps, values, color=colour, label=label, marker="o", markersize=3, linewidth=1.4)
        if run.best_step in steps:
            best = values[steps.index(run.best_step)]
            val_ax.plot([run.best_step], [best], linestyle="none", marker="o", markersize=11,
                        markerfacecolor="none", markeredgecolor=colour, markeredgewidth=2)
            bests.append((run.best_step, best, colour))
    for run in without_metric(runs, metric):  # said in the legend, not silently dropped
        val_ax.plot([], [], linestyle="none", label=f"{labels[runs.index(run)]}: no {metric}, not drawn")
    _label_bests(val_ax, bests)
    for ax in (loss_ax, val_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    if drawn:
        val_ax.set(title=f"validation {metric} (ringed: best, kept)", xlabel="step", ylabel=metric)
    else:
        val_ax.set(title="validation", xlabel="step")
        val_ax.text(0.5, 0.5, "no validation recorded", ha="center", va="center", transform=val_ax.transAxes,
                    color="0.4")
    for ax in (loss_ax, val_ax):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    title = _title(runs)
    if title:
        figure.suptitle(title, fontsize=11)
    return figure


def _label_bests(ax, bests: list[tuple[int, float, str]]) -> None:  # type: ignore[no-untyped-def]
    """``best 0.513`` beside each ringed point, on the side that keeps it inside the panel."""
    if not bests:
        return
    ax.margins(y=0.12)  # room above the highest point for its label
    (left, right), (low, high) = ax.get_xlim(), ax.get_ylim()
    for step, value, colour in bests:
        towards_left = step > left + 0.7 * (right - left)
        below = value > low + 0.8 * (high - low)
        ax.annotate(f"best {value:.3g}", (step, value), textcoords="offset points", fontsize=8, color=colour,
                    xytext=(-8 if towards_left else 8, -8 if below else 8), ha="right" if towards_left else "left",
                    va="top" if below else "bottom")


def _primary(runs: list[RunHistory]) -> str | None:
    names = [r.primary for r in runs if r.primary]
    if len(set(names)) > 1:
        log.warning("the runs select on different metrics (%s); plotting %s; choose one with --metric",
                    ", ".join(sorted(set(names))), names[0])
    if names:
        return names[0]
    # no primary recorded: the first metric any run has
    return next((m for r in runs for m in r.metric_names), None)


def _labels(runs: list[RunHistory]) -> list[str]:
    """Folder names; parent/name where two runs share a name."""
    names = [r.name for r in runs]
    return [f"{r.path.resolve().parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]


def _title(runs: list[RunHistory]) -> str:
    parts = []
    for run in runs:
        if run.method or run.backbone:
            text = " on ".join(x for x in (run.method, run.backbone) if x)
            if text not in parts:
                parts.append(text)
    if len(parts) > 3:
        parts = parts[:3] + [f"+{len(parts) - 3} more"]
    return "; ".join(parts)


def _describe(folder: Path) -> tuple[str | None, str | None]:
    """Method and backbone from the folder's ``adapter_config.json``, when it has a readable one."""
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    if not isinstance(config, dict):
        return None, None
    method, backbone = config.get("method"), config.get("backbone")
    return (method if isinstance(method, str) else None, backbone if isinstance(backbone, str) else None)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
