"""The audit's findings as JSON, and a figure of fidelity against calls (the quotas: ``graytune.audit.quota``).

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

from graytune.audit.quota import THRESHOLD
from graytune.errors import InvalidInputError

JSON_FILE, FIGURE_FILE = "audit.json", "audit.png"
COLOURS = {"black-box": "0.15", "dark-gray": "C0", "light-gray": "C1"}
STYLES = {"outputs": "-", "differences": "--", "vjp": "-"}


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
        for mode, extraction in level["extraction"].items():
            points = [c for c in extraction["checkpoints"] if c["calls"] > 0]
            calls = [c["calls"] for c in points]
            ratio_ax.plot(calls, [c["probe_ratio"] for c in points], marker="o", markersize=3, color=colour,
                          linestyle=STYLES.get(mode, "-"), label=f"{name}: {mode}")
            cosine_ax.plot(calls, [c["cosine"] for c in points], marker="o", markersize=3, color=colour,
                           linestyle=STYLES.get(mode, "-"), label=f"{name} {mode}: cosine")
        geometry = level.get("embedding_geometry")
        if geometry and geometry.get("checkpoints") and "pairwise_cosine_correlation" in geometry["checkpoints"][0]:
            curve = geometry["checkpoints"]
            geometry_ax.plot([c["calls"] for c in curve], [c["pairwise_cosine_correlation"] for c in curve],
                             marker="o", markersize=3, color=colour, label=f"{name} geometry probe")
        rows = level.get("exact_rows")
        if rows and rows.get("rows_read"):
            geometry_ax.plot([rows["spent"]["calls"]], [rows["fraction"]], marker="*", markersize=12,
                             linestyle="none", color=colour, label=f"{name} read grant: rows read")
    curves = [e for level in data["levels"].values() for e in level["extraction"].values()]
    if curves:
        ratio_ax.axhline(curves[0]["checkpoints"][0]["probe_ratio"], color="0.6", linestyle=":", linewidth=1,
                         label="untrained surrogate")
    ratio_ax.axhline(THRESHOLD, color="C3", linestyle="--", linewidth=1, label=f"{THRESHOLD:.0%} of the backbone")
    ratio_ax.set(title="surrogate probe accuracy / backbone's", xlabel="boundary calls", ylabel="ratio")
    cosine_ax.set(title="held-out cosine with the backbone", xlabel="boundary calls", ylabel="cosine")
    geometry_ax.set(title="token-embedding rows", xlabel="boundary calls", ylabel="pairwise-cosine correlation")
    for name, level in data["levels"].items():
        calls = level.get("recommended_quota", {}).get("calls", {}).get("value")
        if calls:
            ratio_ax.axvline(calls, color=COLOURS.get(name, "C3"), linestyle=":", linewidth=1.2,
                             label=f"{name} recommended quota (calls)")
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
