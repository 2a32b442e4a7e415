"""Render docs/results-raw.json (written by scripts/results.py) as markdown tables on stdout.

Run: .venv/bin/python scripts/results_table.py > docs/results-tables.md
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict

COLUMNS = {
    "text": [("accuracy", "accuracy %")],
    "image": [("accuracy", "accuracy %")],
    "image-text": [("text_retrieval_recall@1", "i→t R@1 %"), ("image_retrieval_recall@1", "t→i R@1 %"),
                   ("mean_recall", "mean R %")],
    "sketch": [("mAP", "mAP %"), ("P@10", "P@10 %"), ("sketch_recall@1", "inst. R@1 %")],
}
TITLES = {
    "text": "Text: MiniLM, WordNet gloss → supersense (10 classes; 2,000 train, 500 val, 3,000 test); "
            "MiniLM: a contrastively trained sentence encoder",
    "image": "Image: EfficientNet-Lite0 (through the bridge's class-name prompts), Fashion-MNIST at 64 px "
             "(1,000 train, 500 val, 1,000 test); bridge: not contrastively trained",
    "image-text": "Image–text: the bridge on Tux Paint drawing ↔ caption retrieval at 128 px (500 / 85 / 200); "
                  "bridge: not contrastively trained",
    "sketch": "Sketch → drawing: derived edge maps of Tux Paint drawings vs the drawings, 96 px, category-level "
              "(500 / 85 / 200); bridge: not contrastively trained",
}


def fmt(values: list[float]) -> str:
    """Mean ± std over seeds, as percentages (the raw JSON holds 0–1, as CLIP_benchmark)."""
    values = [100.0 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main(path: str = "docs/results-raw.json") -> None:
    raw = json.load(open(path))
    rows = raw["rows"]
    by_setting: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_setting[row["setting"]][row["method"]].append(row)
    print(f"Steps per method: {raw['steps']}, batch {raw['batch_size']}; learning rates: "
          + ", ".join(f"{k} {v:g}" for k, v in raw["lr"].items()) + ".\n")
    for setting in COLUMNS:
        if setting not in by_setting:
            continue
        methods = by_setting[setting]
        seeds = sorted({r["seed"] for rs in methods.values() for r in rs})
        print(f"### {TITLES[setting]}\n\nSeeds {', '.join(map(str, seeds))}; mean ± std over seeds; test split.\n")
        cols = COLUMNS[setting]
        print("| method | access | trainable params | " + " | ".join(c for _, c in cols)
              + " | step s | peak MB |")
        print("|---|---|---:|" + "---:|" * len(cols) + "---:|---:|")
        for method, rs in methods.items():
            cells = [fmt([r["test"][key] for r in rs]) for key, _ in cols]
            step = statistics.median(r["step_seconds"] for r in rs)
            peak = statistics.median(r["peak_mb"] for r in rs)
            print(f"| {method} | {rs[0]['access']} | {rs[0]['trainable_parameters']:,} | " + " | ".join(cells)
                  + f" | {step:.2f} | {peak:.0f} |")
        print()


if __name__ == "__main__":
    main(*sys.argv[1:])
