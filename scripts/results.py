"""Regenerate docs/results.md: every method on three real tasks, 3 seeds, equal step budgets.

Run: .venv/bin/python scripts/results.py [--steps 60] [--seeds 0,1,2] [--out docs/results-raw.json]
(about an hour on 2 cores). It writes the raw rows as JSON; scripts/results_table.py renders them.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from graytune.methods import METHODS
from graytune.recipes.compare import compare

SETTINGS = [
    # (name, backbone, data, image size, methods)
    ("text", "minilm", "wordnet-supersense", None,
     ["zero-shot", "output", "output-mlp", "dga", "lga", "adalink+output", "lora", "full"]),
    ("image", "bridge:efficientnet-lite0+minilm", "fashion-mnist", 64,
     ["zero-shot", "output", "output-mlp", "dga", "lga", "adalink+output", "lora", "full"]),
    ("image-text", "bridge:efficientnet-lite0+minilm", "tuxpaint", 128,
     ["zero-shot", "output", "output-mlp", "dga", "lga", "adalink+output", "lora", "full"]),
    ("sketch", "bridge:efficientnet-lite0+minilm", "tuxpaint-sketch", 96,
     ["zero-shot", "output", "output-mlp", "dga", "lga", "lora", "full"]),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default="", help="comma-separated setting names")
    parser.add_argument("--out", default="docs/results-raw.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    done.update(steps=args.steps, lr={m: METHODS[m].lr for m in METHODS if METHODS[m].lr}, batch_size=32)
    have = {(r["setting"], r["seed"], r["method"]) for r in done["rows"]}
    for name, backbone, data, size, methods in SETTINGS:
        if args.only and name not in args.only.split(","):
            continue
        for seed in (int(s) for s in args.seeds.split(",")):
            todo = [m for m in methods if (name, seed, m) not in have]
            if not todo:
                continue
            start = time.perf_counter()
            for row in compare(backbone, data, todo, args.steps, seed, size, progress=False):
                row.update(setting=name, seed=seed, backbone=backbone, data=data, image_size=size)
                done["rows"].append(row)
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps(done, indent=1))
                tmp.replace(out)  # resumable: finished rows survive an interruption
            logging.info("%s seed %d: %.0f s", name, seed, time.perf_counter() - start)


if __name__ == "__main__":
    main()
