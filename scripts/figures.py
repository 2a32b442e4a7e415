"""Draw docs/figures/*.png from the committed raw results: test metric vs trainable parameters, by access level.

Run: .venv/bin/python scripts/figures.py [--results docs/results-raw.json]
     [--transmiter docs/transmiter-concrete-raw.json] [--out docs/figures]

One small PNG (640 × 400) per task of docs/results.md: the task's primary test metric (mean over seeds,
bars: sample std) against trainable parameters on a log axis, colour and marker by access level, methods
named beside their points; zero-shot (no parameters) is a dashed line. Reads only the JSON files; seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

SIZE, DPI = (6.4, 4.0), 100
ACCESS_STYLE = {  # colour and marker per access level, in the order of the levels
    "black-box": ("#222222", "o"),
    "dark-gray": ("#1f77b4", "s"),
    "light-gray": ("#2ca02c", "^"),
    "white-box": ("#d62728", "D"),
}
BRIDGE_NOTE = "bridge backbone: real parts, not contrastively trained (not a CLIP)"
TASKS = {  # setting in results-raw.json -> (file, primary test metric, axis label, title)
    "text": ("results-text.png", "accuracy", "test accuracy %",
             "Text: MiniLM, WordNet gloss → supersense"),
    "image": ("results-image.png", "accuracy", "test accuracy %",
              "Image: EfficientNet-Lite0 bridge, Fashion-MNIST 64 px"),
    "image-text": ("results-image-text.png", "mean_recall", "test mean recall %",
                   "Image–text: bridge, Tux Paint retrieval 128 px"),
    "sketch": ("results-sketch.png", "mAP", "test mAP %",
               "Sketch → drawing: bridge, Tux Paint edge maps 96 px"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="docs/results-raw.json", help="written by scripts/results.py")
    parser.add_argument("--transmiter", default="docs/transmiter-concrete-raw.json",
                        help="written by scripts/transmiter_results.py (the committed table's concrete draw; the "
                             "balanced rerun writes docs/transmiter-raw.json)")
    parser.add_argument("--out", default="docs/figures", help="folder for the PNGs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = json.loads(Path(args.results).read_text())
    for path in results_figures(raw, out) + [transmiter_figure(json.loads(Path(args.transmiter).read_text()),
                                                               raw, out)]:
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


def results_figures(raw: dict, out: Path) -> list[Path]:
    """One figure per setting of docs/results-raw.json."""
    by_setting: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in raw["rows"]:
        by_setting[row["setting"]][row["method"]].append(row)
    written = []
    for setting, methods in by_setting.items():
        if setting not in TASKS:
            print(f"skipping setting {setting!r}: add it to TASKS in scripts/figures.py to draw it")
            continue
        file, metric, label, title = TASKS[setting]
        points, lines = [], []
        for method, rows in methods.items():
            values = percent([r["test"][metric] for r in rows])
            params = rows[0]["trainable_parameters"]
            if params == 0:
                lines.append((method, statistics.mean(values)))
            else:
                points.append((method, rows[0]["access"], params, values))
        bridge = any("bridge:" in r["backbone"] for rows in methods.values() for r in rows)
        seeds = sorted({r["seed"] for rows in methods.values() for r in rows})
        note = f"{len(seeds)} seeds, mean ± std; {raw['steps']} steps per method"
        written.append(draw(out / file, title, label, points, lines, note, bridge))
    return written


def transmiter_figure(raw: dict, results: dict, out: Path) -> Path:
    """Harmonic mean of base and novel accuracy for every row of a TransMiter raw file (``--transmiter``)."""
    from graytune.adapters.transmiter import TransMiterAdapter, TransMiterConfig

    def transmiter_params(classes: int) -> int:
        return sum(p.numel() for p in TransMiterAdapter(TransMiterConfig(classes=classes, dim=classes)).parameters())

    # the weak and strong DGA fine-tunes: same adapters on both bridges (3-channel pixels, MiniLM's 384-d
    # embeddings), so the count of the bridge DGA run in results-raw.json
    dga = next(r["trainable_parameters"] for r in results["rows"]
               if r["method"] == "dga" and r["backbone"] == raw["weak"])
    task_classes = 10
    rows: dict[str, list[float]] = defaultdict(list)
    for seed_rows in raw["seeds"].values():
        for name, metrics in seed_rows.items():
            rows[name].append(metrics["harmonic_mean"])
    points, lines = [], []
    for name, values in rows.items():
        values = percent(values)
        if "zero-shot" in name:
            lines.append((name, statistics.mean(values)))
        elif "fine-tuned" in name:
            points.append((name.replace(" (DGA, upper bound)", " (DGA)"), "dark-gray", dga, values))
        elif "auxiliary" in name:
            points.append((name, "black-box", transmiter_params(task_classes), values))
        else:
            points.append((name.replace(" (16 shots per base class)", " (16 shots)"), "black-box",
                           transmiter_params(raw["classes"]), values))
    note = f"{len(raw['seeds'])} seeds, mean ± std; weak Lite0 → strong Lite1; TransMiter rows black-box"
    return draw(out / "transmiter.png", "TransMiter: Fashion-MNIST base-to-novel 5/5 at 64 px",
                "test HM of base and novel accuracy %", points, lines, note, bridge=True)


def draw(path: Path, title: str, ylabel: str, points: list[tuple[str, str, int, list[float]]],
         lines: list[tuple[str, float]], note: str, bridge: bool) -> Path:
    """Points (method, access, params, per-seed values) on a log x axis; ``lines``: zero-parameter rows."""
    figure = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    ax = figure.subplots()
    for access, (colour, marker) in ACCESS_STYLE.items():
        mine = [p for p in points if p[1] == access]
        if not mine:
            continue
        xs = [p[2] for p in mine]
        ys = [statistics.mean(p[3]) for p in mine]
        errs = [statistics.stdev(p[3]) if len(p[3]) > 1 else 0.0 for p in mine]
        ax.errorbar(xs, ys, yerr=errs, linestyle="none", marker=marker, markersize=6, color=colour,
                    capsize=2, label=access)
    for (name, value), style in zip(lines, ("--", ":", "-.")):
        ax.axhline(value, color="0.45", linestyle=style, linewidth=1, label=f"{name} ({value:.1f})")
    ax.set_xscale("log")
    xs = [p[2] for p in points]
    ax.set_xlim(min(xs) / 3, max(xs) * 6)
    spread = [statistics.stdev(p[3]) if len(p[3]) > 1 else 0.0 for p in points]
    low = [statistics.mean(p[3]) - s for p, s in zip(points, spread)] + [v for _, v in lines]
    high = [statistics.mean(p[3]) + s for p, s in zip(points, spread)] + [v for _, v in lines]
    span = max(high) - min(low) or 1.0
    ax.set_ylim(min(low) - 0.08 * span, max(high) + 0.08 * span)
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(f"{title}\n{note}" + (f"\n{BRIDGE_NOTE}" if bridge else ""), fontsize=8.5)
    named = [(p[0], p[2], statistics.mean(p[3])) for p in points]
    ax.legend(fontsize=7, loc=legend_corner(ax, named), framealpha=0.9)
    label_points(figure, ax, named)
    figure.savefig(path, dpi=DPI, metadata={"Software": None})  # no version stamp: regenerating changes nothing
    return path


def label_points(figure: Figure, ax, points: list[tuple[str, float, float]]) -> None:
    """Name each point beside it, at the first nearby spot that hits no marker, label, legend or frame."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure).draw()  # fixes the layout, so that data map to final pixels
    renderer = figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = [ax.get_legend().get_window_extent(renderer)] if ax.get_legend() else []
    taken += [Bbox.from_bounds(*(ax.transData.transform((x, y)) - 6), 12, 12) for _, x, y in points]
    candidates = [(8, 0, "left"), (-8, 0, "right")] + [(dx, dy * k, ha) for k in (1, 2, 3, 4) for dy in (10, -10)
                                                        for dx, ha in ((8, "left"), (-8, "right"))]
    for name, x, y in sorted(points, key=lambda p: -p[2]):
        for dx, dy, ha in candidates:
            label = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                                ha=ha, va="center", color="0.15",
                                arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5} if dy else None)
            label.update_positions(renderer)
            box = Text.get_window_extent(label, renderer).padded(1)  # the words, not the leader line
            if frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1) and not any(
                    box.overlaps(t) for t in taken):
                break
            label.remove()
        else:  # no free spot: to the right, whatever it hits
            label = ax.annotate(name, (x, y), xytext=(8, 0), textcoords="offset points", fontsize=7,
                                va="center", color="0.15")
            label.update_positions(renderer)
            box = Text.get_window_extent(label, renderer)
        taken.append(box)


def legend_corner(ax, points: list[tuple[str, float, float]]) -> str:
    """The corner of the axes with the fewest points in it, for the legend."""
    fractions = [ax.transAxes.inverted().transform(ax.transData.transform((x, y))) for _, x, y in points]
    corners = {"lower right": (0.6, 0.0), "upper right": (0.6, 0.55), "lower left": (0.0, 0.0),
               "upper left": (0.0, 0.55)}
    return min(corners, key=lambda c: sum(corners[c][0] <= fx <= corners[c][0] + 0.4
                                          and corners[c][1] <= fy <= corners[c][1] + 0.45 for fx, fy in fractions))


def percent(values: list[float]) -> list[float]:
    """Values on a 0–100 scale: raw files from before the 0–1 change hold percentages, later ones fractions."""
    return [100.0 * v for v in values] if max(values) <= 1.0 else list(values)


if __name__ == "__main__":
    main()
