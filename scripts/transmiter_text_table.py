"""Render a raw file of scripts/transmiter_text.py: the MiniLM → MPNet TransMiter table (base, novel, HM as
mean ± std over seeds), the paper's pattern as a hypothesis and whether the numbers hold it, timings, and a
figure: docs/figures/transmiter-text.png for WordNet, transmiter-text-<data>.png for another text set, with
``-concrete`` before ``.png`` for a file drawn with the earlier ``concrete`` auxiliary names (so rendering the old
table does not overwrite the new one's figure).

Run: .venv/bin/python scripts/transmiter_text_table.py [--raw docs/transmiter-text-raw.json]
     [--figures docs/figures] > table.md

Markdown goes to stdout; reads only the JSON file; seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

SIZE, DPI = (7.2, 4.6), 100
KEYS = ("base_accuracy", "novel_accuracy", "harmonic_mean")
#: the auxiliary-name draws (``graytune.transfer.classes``), as the header names them; a raw file without one: concrete
DRAWN = {"balanced": "drawn equally from WordNet's noun categories, the task's own categories left out",
         "concrete": "drawn uniformly from five concrete WordNet categories: animal, artifact, food, object, plant"}
#: data set -> (what it is, what one test item is); the study's text sets
DATA = {"wordnet-supersense": ("WordNet supersenses", "glosses"), "fortunes": ("Debian fortunes by topic", "quotes")}


def data_of(raw: dict[str, Any]) -> tuple[str, str, str]:
    """(data set, its description, its items), from the raw file's ``data`` (e.g. ``fortunes:base-to-novel``)."""
    name = raw["data"].split(":")[0]
    return (name, *DATA.get(name, (name, "texts")))


def draw_of(raw: dict[str, Any]) -> str:
    """How the auxiliary names were drawn; a raw file that predates the field was drawn ``concrete``."""
    return raw["protocol"].get("aux_draw", "concrete")


def figure_name(raw: dict[str, Any]) -> str:
    name = data_of(raw)[0]
    stem = "transmiter-text" if name == "wordnet-supersense" else f"transmiter-text-{name}"
    return stem + ("-concrete" if draw_of(raw) == "concrete" else "") + ".png"


def labels(protocol: dict[str, Any], sizes: dict[str, Any]) -> dict[str, str]:
    """Row key → what the row is, with the protocol's values filled in (table order)."""
    n, c = sizes.get("pool_base", "N"), protocol["beta_per_sample"]
    small = max(2, round(protocol["small_pool"] * n)) if isinstance(n, int) else "N/4"
    ft = f"{protocol['ft_method']} adapter, {protocol['ft_steps']} steps"
    k = sizes.get("classes", 10)  # the WordNet raw file predates the field: 10 supersenses
    return {
        "weak_zs": "weak zero-shot (MiniLM)",
        "strong_zs": "strong zero-shot (MPNet)",
        "weak_ft": f"weak fine-tuned (MiniLM, {ft}; the teacher)",
        "strong_ft": f"strong fine-tuned (MPNet, {ft}; upper bound)",
        "eft": "EFT: strong zero-shot + (weak fine-tuned − weak zero-shot)",
        "tm": f"**TransMiter on MPNet** (base-only pool, N = {n}, β = {protocol['beta']:g})",
        "tm_plus": f"TransMiter+ ({protocol['shots']} shots per base class, {protocol['plus_steps']} steps)",
        "tm_all_pool": f"TransMiter, pool of all {k} classes (transductive, N = {sizes.get('pool_all', '?')})",
        "no_basis_change": "ablation: no basis change",
        "no_aux": f"ablation: no auxiliary classes (M = {k})",
        "noise_per_sample": "ablation: noise one coin per sample (not per batch)",
        "beta_per_sample": f"ablation: β = {c:g}·N (N = {n})",
        "beta_fixed_small": f"ablation: β = {protocol['beta']:g} fixed, transfer on N = {small}",
        "beta_per_sample_small": f"ablation: β = {c:g}·N, transfer on N = {small}",
    }


def values(raw: dict[str, Any], key: str, metric: str) -> list[float]:
    return [100.0 * rows[key][metric] for rows in raw["seeds"].values() if key in rows]


def cell(xs: list[float]) -> str:
    if not xs:
        return "–"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"


def mean_sd(raw: dict[str, Any], key: str, metric: str = "harmonic_mean") -> tuple[float, float]:
    xs = values(raw, key, metric)
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


NAMES = {"harmonic_mean": "HM", "base_accuracy": "base", "novel_accuracy": "novel"}


def verdict(raw: dict[str, Any], metric: str = "harmonic_mean") -> str:
    """Whether this run's means hold the paper's pattern on ``metric`` (≲: within the larger seed std)."""
    needed = ("strong_zs", "weak_ft", "tm", "strong_ft")
    if not all(values(raw, k, metric) for k in needed):
        return f"{NAMES[metric]}: not checked, a row it needs is missing."
    zs, ft, tm, up = (mean_sd(raw, k, metric) for k in needed)
    floor = max(zs[0], ft[0])
    slack = max(tm[1], up[1])
    lower, upper = tm[0] >= floor, tm[0] <= up[0] + slack
    why = []
    if not lower:
        why.append(f"TransMiter {tm[0]:.1f} is below max(strong zero-shot {zs[0]:.1f}, weak fine-tuned {ft[0]:.1f})")
    if not upper:
        why.append(f"TransMiter {tm[0]:.1f} is above strong fine-tuned {up[0]:.1f} by more than {slack:.1f}")
    return (f"{NAMES[metric]}: max({zs[0]:.1f}, {ft[0]:.1f}) = {floor:.1f} {'≤' if lower else '>'} TransMiter "
            f"{tm[0]:.1f} {'≲' if upper else '≫'} strong fine-tuned {up[0]:.1f}: the pattern "
            f"**{'holds' if lower and upper else 'does not hold'}**" + (f" ({'; '.join(why)})." if why else "."))


def hypothesis(raw: dict[str, Any]) -> list[str]:
    """The paper's pattern, checked on HM (the headline) and on base and novel accuracy apart."""
    return [
        "**Hypothesis (the paper's pattern):** max(strong zero-shot, weak fine-tuned) ≤ TransMiter ≲ strong "
        "fine-tuned, where ≲ allows TransMiter to exceed strong fine-tuned by at most the larger of their seed "
        "standard deviations; checked on HM, then on base and novel accuracy apart.",
        "",
        *(f"- Measured on {verdict(raw, metric)}" for metric in NAMES),
    ]


def table(raw: dict[str, Any]) -> list[str]:
    names = labels(raw["protocol"], raw.get("sizes", {}))
    k = raw.get("sizes", {}).get("classes", 10)
    lines = [f"| row | base % | novel % | HM % | all {k} classes % |", "|---|---:|---:|---:|---:|"]
    present = {k for rows in raw["seeds"].values() for k in rows}
    for key, name in names.items():
        if key in present:
            cells = [cell(values(raw, key, m)) for m in (*KEYS, "accuracy")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def provenance(raw: dict[str, Any]) -> list[str]:
    """Which rows were copied from a raw file drawn otherwise (``--reuse``), and which rows this file lacks."""
    lines = []
    reused = raw.get("reused")
    if reused:
        keys = sorted({k for rows in reused["rows"].values() for k in rows})
        gaps = reused.get("teacher_gap", {})
        gap = max(gaps.values(), default=None)
        teacher = ("" if gap is None else " The teacher, trained again in this run (seeds "
                   f"{', '.join(sorted(gaps))}), " + ("gives its copied row's metrics exactly." if gap == 0 else
                                                      f"differs from its copied row by up to {100 * gap:.2f} points."))
        lines.append(f"Copied from `{reused['from']}` (drawn `{reused['aux_draw']}`), because they score no "
                     f"auxiliary name: {', '.join(f'`{k}`' for k in keys)}.{teacher}")
    present = {k for rows in raw["seeds"].values() for k in rows}
    names = labels(raw["protocol"], raw.get("sizes", {}))
    missing = [name.replace("**", "") for key, name in names.items() if key not in present]
    if missing:
        lines.append(f"Not in this raw file (not run with this draw): {'; '.join(missing)}.")
    return lines


def timings(raw: dict[str, Any]) -> str:
    def avg(key: str, field: str) -> str:
        xs = [rows[key][field] for rows in raw["seeds"].values() if key in rows and field in rows[key]]
        return f"{statistics.mean(xs):.1f}" if xs else "–"

    threads = raw.get("torch_threads", "?")
    copied = {k for rows in raw.get("reused", {}).get("rows", {}).values() for k in rows}
    fine_tuning = (f"fine-tuning MiniLM {avg('weak_ft', 'train_s')} s, MPNet {avg('strong_ft', 'train_s')} s")
    if {"weak_ft", "strong_ft"} & copied:
        fine_tuning += f" (copied rows: the times of `{raw['reused']['from']}`)"
    return (f"Per seed (mean): extraction {avg('tm', 'extract_s')} s, basis change {avg('tm', 'transfer_s')} s, "
            f"TransMiter+ {avg('tm_plus', 'plus_s')} s ({threads} torch thread{'' if threads == 1 else 's'}); "
            f"{fine_tuning}.")


def figure(raw: dict[str, Any], path: Path) -> Path:
    """A dot per row and metric (base, novel, HM): mean over seeds, the std as a bar; the axis fits the data."""
    from matplotlib.figure import Figure

    names = labels(raw["protocol"], raw.get("sizes", {}))
    present = {k for rows in raw["seeds"].values() for k in rows}
    keys = [k for k in names if k in present]
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    low, high = 100.0, 0.0
    for i, (metric, label, marker) in enumerate(zip(KEYS, ("base", "novel", "HM"), "o^s")):
        stats = [mean_sd(raw, k, metric) for k in keys]
        low, high = min(low, *(m - s for m, s in stats)), max(high, *(m + s for m, s in stats))
        ax.errorbar([m for m, _ in stats], [j + (i - 1) * 0.22 for j in range(len(keys))],
                    xerr=[s for _, s in stats], fmt=marker, color=f"C{i}", markersize=4, linewidth=0.9, capsize=2,
                    label=label)
    if "tm" in keys:
        ax.axvline(mean_sd(raw, "tm")[0], color="0.3", linestyle="--", linewidth=0.8, label="TransMiter HM")
    ax.set_yticks(range(len(keys)), [names[k].replace("**", "") for k in keys], fontsize=6.5)
    ax.invert_yaxis()
    ax.set_xlim(max(0.0, low - 2), min(100.0, high + 2))
    ax.set_xlabel("test accuracy %: base among base classes, novel among novel", fontsize=8)
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(f"TransMiter, MiniLM → all-mpnet-base-v2\n{data_of(raw)[1]} base-to-novel, seeds "
                 f"{', '.join(raw['seeds'])}: mean ± std; auxiliary names drawn {draw_of(raw)}", fontsize=8)
    fig.savefig(path, dpi=DPI, metadata={"Software": None})  # no version stamp: regenerating changes nothing
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", default="docs/transmiter-text-raw.json", help="written by scripts/transmiter_text.py")
    parser.add_argument("--figures", default="docs/figures", help="folder for the figure")
    args = parser.parse_args(argv)
    raw = json.loads(Path(args.raw).read_text())
    p, sizes = raw["protocol"], raw.get("sizes", {})
    _, _, items = data_of(raw)
    print(f"Weak {raw['weak']} → strong all-mpnet-base-v2 (model.safetensors SHA-256 {raw['strong_sha256'][:12]}…), "
          f"{raw['data']}: {sizes.get('test', '?')} test {items}; unlabeled pool: the training {items}, labels "
          f"unused; M = {p['classes']} classes (task + WordNet auxiliary nouns, "
          f"{DRAWN[draw_of(raw)]}); "
          f"extraction {p['extract_epochs']} "
          f"epochs of batch 128, logit noise one coin per {p['noise_per']}; seeds {', '.join(raw['seeds'])}.\n")
    if notes := provenance(raw):
        print("\n\n".join(notes) + "\n")
    print("\n".join(hypothesis(raw)) + "\n")
    print("\n".join(table(raw)) + "\n")
    print(timings(raw))
    folder = Path(args.figures)
    folder.mkdir(parents=True, exist_ok=True)
    path = figure(raw, folder / figure_name(raw))
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)", file=sys.stderr)


if __name__ == "__main__":
    main()
