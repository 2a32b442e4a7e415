"""The audit's findings: a recommended quota per level, the JSON, and a figure of fidelity against calls.

The quota rule (issue 13): stay 10x below the calls at which the surrogate's linear probe reaches
90 % of the backbone's. Checkpoints are log-spaced, so the crossing lies between the last checkpoint
below 90 % and the first at or above it; the quota is a tenth of the *last checkpoint below*, which
keeps it at least 10x below the crossing. A level may also run every attack of the levels below it,
so its quota is the smallest among the audited levels up to it.

Example:
    >>> report.write("audit-out")            # audit-out/audit.json and audit-out/audit.png
    >>> report.data["levels"]["dark-gray"]["recommended_quota"]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graytune.errors import InvalidInputError
from graytune.types import AccessLevel

THRESHOLD = 0.9  # of the backbone's probe accuracy
MARGIN = 10  # how far below the crossing the quota stays
JSON_FILE, FIGURE_FILE = "audit.json", "audit.png"
COLOURS = {"black-box": "0.15", "dark-gray": "C0", "light-gray": "C1"}


def recommend(checkpoints: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    """The quota for one extraction curve (see the module docstring)."""
    hit = next((i for i, c in enumerate(checkpoints) if c["probe_ratio"] >= THRESHOLD), None)
    best = max(checkpoints, key=lambda c: c["probe_ratio"])
    if hit is None:
        return {"reached": False, "quota": "not reached within the budget",
                "best_probe_ratio": best["probe_ratio"], "best_at_calls": best["calls"],
                "note": (f"the surrogate stayed below {THRESHOLD:.0%} of the backbone's probe accuracy in "
                         f"{checkpoints[-1]['calls']:,} calls; this audit supports at most a quota of "
                         f"{checkpoints[-1]['calls'] // MARGIN:,} calls; run a larger --budget to find the crossing")}
    if hit == 0:
        return {"reached": True, "calls_to_90": 0, "quota": "not measurable",
                "note": ("the untrained surrogate's random features already reach the threshold: the probe task is "
                         "too easy to tell extraction apart; pick a harder --data")}
    before, at = checkpoints[hit - 1], checkpoints[hit]
    untrained = checkpoints[0]["probe_ratio"] if checkpoints[0]["calls"] == 0 else None
    quota = {key: before[key] // MARGIN for key in ("calls", "samples", "grad_rows")}
    result = {"reached": True, "calls_to_90": {"more_than": before["calls"], "at_most": at["calls"]},
              "quota": quota,
              "rule": (f"a tenth of {before['calls']:,} calls, the last checkpoint below {THRESHOLD:.0%} of the "
                       "backbone's probe accuracy (so at least 10x below the crossing)")}
    notes = []
    if untrained is not None and untrained >= THRESHOLD - 0.1:
        notes.append(f"the untrained surrogate's random features already reach {untrained:.0%} of the backbone's "
                     "probe accuracy: the crossing says little about extraction on this task; read the cosine and "
                     "explained-variance curves too, or pick a harder --data")
    if quota["calls"] == 0:
        notes.append(f"the crossing came within {at['calls']} calls: no quota in calls protects this level at this "
                     "batch size; bound samples and gradient rows instead, or lower the level")
    if notes:
        result["note"] = "; ".join(notes)
    return result


def combine(levels: dict[str, dict[str, Any]]) -> None:
    """Give each level the lowest quota among the audited levels up to it (a client can run the attacks below)."""
    ordered = sorted(levels, key=lambda name: AccessLevel.parse(name))
    for i, name in enumerate(ordered):
        own = levels[name]["recommended_quota"] = dict(levels[name]["extraction_quota"])
        for lower in ordered[:i]:
            theirs = levels[lower]["extraction_quota"]
            if isinstance(theirs.get("quota"), dict) and (
                    not isinstance(own.get("quota"), dict) or theirs["quota"]["calls"] < own["quota"]["calls"]):
                levels[name]["recommended_quota"] = own = {**theirs, "from_level": lower}


@dataclass
class AuditReport:
    """What ``run_audit`` found, as plain data (``data``), and how to write it."""

    data: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, sort_keys=False)

    def write(self, out: str | Path, overwrite: bool = False) -> dict[str, Path]:
        """``out/audit.json`` and ``out/audit.png``; refuses to replace them without ``overwrite``."""
        folder = Path(out)
        paths = {"json": folder / JSON_FILE, "figure": folder / FIGURE_FILE}
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing and not overwrite:
            raise InvalidInputError(f"{', '.join(existing)} exist; choose another --out or pass --overwrite")
        folder.mkdir(parents=True, exist_ok=True)
        paths["json"].write_text(self.to_json() + "\n", encoding="utf-8")
        plot_audit(self.data, paths["figure"])
        return paths


def plot_audit(data: dict[str, Any], path: Path) -> None:
    """Probe ratio (left), held-out cosine (middle) and embedding geometry (right) against calls, per level."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    figure = Figure(figsize=(13.5, 4.2), dpi=100, layout="constrained")
    ratio_ax, cosine_ax, geometry_ax = figure.subplots(1, 3)
    for name, level in data["levels"].items():
        colour = COLOURS.get(name, "C3")
        points = [c for c in level["extraction"]["checkpoints"] if c["calls"] > 0]
        calls = [c["calls"] for c in points]
        ratio_ax.plot(calls, [c["probe_ratio"] for c in points], marker="o", markersize=3, color=colour, label=name)
        cosine_ax.plot(calls, [c["cosine"] for c in points], marker="o", markersize=3, color=colour,
                       label=f"{name} cosine")
        cosine_ax.plot(calls, [c["explained_variance"] for c in points], linestyle="--", color=colour,
                       label=f"{name} explained variance")
        geometry = level.get("embedding_geometry")
        if geometry and geometry.get("checkpoints") and "pairwise_cosine_correlation" in geometry["checkpoints"][0]:
            curve = geometry["checkpoints"]
            geometry_ax.plot([c["calls"] for c in curve], [c["pairwise_cosine_correlation"] for c in curve],
                             marker="o", markersize=3, color=colour, label=f"{name} geometry probe")
        rows = level.get("exact_rows")
        if rows and rows.get("rows_read"):
            geometry_ax.plot([rows["spent"]["calls"]], [rows["fraction"]], marker="*", markersize=12,
                             linestyle="none", color=colour, label=f"{name} read grant: rows read")
    untrained = next(iter(data["levels"].values()))["extraction"]["checkpoints"][0]["probe_ratio"]
    ratio_ax.axhline(THRESHOLD, color="C3", linestyle="--", linewidth=1, label=f"{THRESHOLD:.0%} of the backbone")
    ratio_ax.axhline(untrained, color="0.6", linestyle=":", linewidth=1, label="untrained surrogate")
    ratio_ax.set(title="surrogate probe accuracy / backbone's", xlabel="boundary calls", ylabel="ratio")
    cosine_ax.set(title="held-out agreement with the backbone", xlabel="boundary calls", ylabel="value")
    geometry_ax.set(title="token-embedding rows", xlabel="boundary calls", ylabel="pairwise-cosine correlation")
    for name, level in data["levels"].items():
        quota = level.get("recommended_quota", {}).get("quota")
        if isinstance(quota, dict) and quota["calls"] > 0:
            ratio_ax.axvline(quota["calls"], color=COLOURS.get(name, "C3"), linestyle=":", linewidth=1.2,
                             label=f"{name} recommended quota")
    geometry_ax.set_ylim(-0.05, 1.05)
    for ax in (ratio_ax, cosine_ax, geometry_ax):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    if not geometry_ax.get_legend_handles_labels()[0]:
        geometry_ax.text(0.5, 0.5, "not measured\n(text at dark-gray and up)", ha="center", va="center",
                         transform=geometry_ax.transAxes, color="0.4")
    figure.suptitle(f"graytune audit: {data['backbone']} ({data['modality']} tower), {data['rows_per_call']} rows "
                    f"per call, probe on {data['data']['name']}", fontsize=11)
    figure.savefig(path, dpi=100)


def jsonable(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
