"""TransMiter on real backbones: weak Lite0 bridge → strong Lite1 bridge, Fashion-MNIST base-to-novel 5/5.

Run: .venv/bin/python scripts/transmiter_results.py [--seeds 0,1,2] [--aux-draw D] [--out docs/transmiter-raw.json]
The auxiliary names are drawn as ``--aux-draw`` says (``graytune.transfer.classes``: ``balanced``, the default, or
``concrete``, the draw of the first table, kept in docs/transmiter-concrete-raw.json); a raw file holds one draw.
Rows: weak zero-shot, weak fine-tuned (DGA, dark-gray, base classes), strong zero-shot, TransMiter on
strong, TransMiter+ on strong (16 labels per base class, selected on val), strong fine-tuned (the
upper bound), and the ablations without auxiliary classes and without the basis change.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from graytune.access import open_backbone
from graytune.artifacts import load_adapter
from graytune.data.catalog import load_splits
from graytune.data.labeled import load_fashion_mnist
from graytune.recipes.run import RunSpec, train_and_save
from graytune.train.config import TrainConfig
from graytune.recipes.transmiter import base_novel_accuracy, load_pixels, plus
from graytune.transfer.transmiter import ExtractConfig, TransMiter, class_scores

WEAK, STRONG = "bridge:efficientnet-lite0+minilm", "bridge:efficientnet-lite1+minilm"
DATA, SIZE, PROMPT = "fashion-mnist:base-to-novel", 64, "a picture of a {}"
BASE, NOVEL = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


def fine_tune(backbone: str, seed: int, folder: Path, steps: int) -> str:
    out = folder / f"{backbone.split(':')[1]}-dga-{seed}"
    train_and_save(RunSpec(backbone, "dark-gray", "dga", DATA, out=str(out), image_size=SIZE,
                           train=TrainConfig(lr=3e-3, max_steps=steps, seed=seed)), progress=False)
    return str(out)


def run_seed(seed: int, folder: Path, steps: int, total: int, unlabeled: int, aux_draw: str = "balanced",
             ) -> dict[str, dict[str, float]]:
    splits = load_splits(DATA, seed=0)
    names = list(splits.train.class_names)
    weak, strong = open_backbone(WEAK, "black-box"), open_backbone(STRONG, "black-box")
    full = load_fashion_mnist("train")  # the catalog draws train (first 1,000) and val (next 500) from this order
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(0)).tolist()
    pool = full.subset(order[1500 + seed * unlabeled:1500 + (seed + 1) * unlabeled])  # disjoint from train/val/test
    px = load_pixels(splits, weak, SIZE, unlabeled=pool, shots=16)
    rows: dict[str, dict[str, float]] = {}

    def score(label: str, scores: torch.Tensor) -> None:
        rows[label] = base_novel_accuracy(scores[:, :len(names)], px.test_labels, BASE, NOVEL)
        logging.info("seed %d %s: %s", seed, label, rows[label])

    weak_ft = load_adapter(fine_tune(WEAK, seed, folder, steps), open_backbone(WEAK, "dark-gray"))
    strong_ft = load_adapter(fine_tune(STRONG, seed, folder, steps), open_backbone(STRONG, "dark-gray"))
    start = time.perf_counter()
    zero_shot_test = class_scores(strong, px.test, names, PROMPT)
    zs_seconds = time.perf_counter() - start
    score("weak zero-shot", class_scores(weak, px.test, names, PROMPT))
    score("weak fine-tuned (DGA)", class_scores(weak_ft, px.test, names, PROMPT))
    score("strong zero-shot", zero_shot_test)
    score("strong fine-tuned (DGA, upper bound)", class_scores(strong_ft, px.test, names, PROMPT))

    for label, m in (("TransMiter", total), ("ablation: no auxiliary classes", len(names))):
        tm = TransMiter.create(names, total=m, seed=seed, prompt=PROMPT, aux_draw=aux_draw)
        weak_u = tm.scores(weak, px.unlabeled)
        teacher = tm.scores(weak_ft, px.unlabeled)[:, :len(names)]
        start = time.perf_counter()
        tm.extract(weak_u, teacher, ExtractConfig(seed=seed, noise_per="sample"))  # as docs/transmiter-raw.json
        extract_seconds = time.perf_counter() - start
        start = time.perf_counter()
        moved = tm.transfer(weak_u, tm.scores(strong, px.unlabeled))
        transfer_seconds = time.perf_counter() - start
        start = time.perf_counter()
        score(label, moved.predict(strong, px.test))
        rows[label].update(extract_s=extract_seconds, transfer_s=transfer_seconds,
                           inference_ratio=(time.perf_counter() - start) / zs_seconds if m == total else 0.0)
        if m == total:
            score("ablation: no basis change", tm.adapt(tm.scores(strong, px.test)))
            best = plus(moved, strong, px, seed=seed)
            score("TransMiter+ (16 shots per base class)", moved.predict(strong, px.test))
            rows["TransMiter+ (16 shots per base class)"]["val_accuracy"] = best["val_accuracy"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps of the weak and strong DGA")
    parser.add_argument("--classes", type=int, default=1024, help="M: task plus auxiliary classes")
    parser.add_argument("--unlabeled", type=int, default=2000)
    parser.add_argument("--aux-draw", default="balanced", choices=("balanced", "concrete"))
    parser.add_argument("--out", default="docs/transmiter-raw.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.is_file() else {"seeds": {}, "aux_draw": args.aux_draw}
    if done["seeds"] and done.get("aux_draw", "concrete") != args.aux_draw:
        parser.error(f"{out} holds rows drawn {done.get('aux_draw', 'concrete')!r}, not {args.aux_draw!r}: pass that "
                     "--aux-draw to resume it, or --out another file")
    done.update(steps=args.steps, classes=args.classes, unlabeled=args.unlabeled, weak=WEAK, strong=STRONG,
                data=DATA, image_size=SIZE, aux_draw=args.aux_draw)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            if str(seed) in done["seeds"]:
                continue
            done["seeds"][str(seed)] = run_seed(seed, Path(tmp), args.steps, args.classes, args.unlabeled,
                                                args.aux_draw)
            out.write_text(json.dumps(done, indent=1))




def table(path: str = "docs/transmiter-raw.json") -> str:
    """Markdown of the raw rows: base, novel, HM as mean ± std over seeds (HM computed per seed, then averaged)."""
    import statistics

    raw = json.loads(Path(path).read_text())
    seeds = sorted(raw["seeds"])
    labels = list(raw["seeds"][seeds[0]])
    lines = ["| row | base % | novel % | HM % |", "|---|---:|---:|---:|"]
    for label in labels:
        cells = []
        for key in ("base_accuracy", "novel_accuracy", "harmonic_mean"):
            values = [100.0 * raw["seeds"][s][label][key] for s in seeds]  # raw: 0–1; table: %
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {sd:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    tm = [raw["seeds"][s]["TransMiter"] for s in seeds]
    lines.append("")
    lines.append(f"Seeds {', '.join(seeds)}. Extraction {statistics.mean(r['extract_s'] for r in tm):.0f} s, transfer "
                 f"{statistics.mean(r['transfer_s'] for r in tm):.1f} s (scoring {raw['unlabeled']} unlabeled images on "
                 f"the strong backbone + the basis change), adapted inference / zero-shot "
                 f"{statistics.mean(r['inference_ratio'] for r in tm):.2f}× on the test images (2 cores).")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--table"]:
        print(table(*sys.argv[2:]))
    else:
        main()
