"""The language-model study (issue 27): every rung of the ladder on SmolLM2-135M (Q4-quantised), two real tasks.

Run: .venv/bin/python scripts/lm_study.py [--backbone smollm2-135m] [--tasks wordnet-category,wordnet-reverse]
     [--methods ...] [--steps 150] [--seeds 0,1,2] [--out docs/lm-raw.json] [--threads 1]
     [--registry-seeds]   # the other seeds at the registry's rate first (a spread before the grids)
     .venv/bin/python scripts/lm_study.py --smoke      # every code path in a few minutes, into a temp folder
then .venv/bin/python scripts/lm_table.py (markdown on stdout).

Protocol, per task and method (the converged study's, scaled to what 2 CPU cores can run):
1. order of work: every method at the registry's learning rate with seed 0 first (a first full table), then
   the rate grid (×1/3 and ×3 on the 1-3-10 ladder, seed 0; one more rate beyond an edge that wins), then
   the other seeds at the chosen rate;
2. each run: ``--steps`` AdamW steps of batch ``--batch-size`` (warm-up 5 %, cosine to zero), validation
   every ``--eval-every`` steps by exact match of the greedy generation on the first ``--val-size`` items of
   the validation split, the best validated state kept, scored once on the first ``--test-size`` test items
   (exact match, and per-token NLL of the completions);
3. the black-box rung is ``prompt-zo`` trained with MeZO's estimator (``--zo mezo``: the estimator made for
   language models, two forward calls a step).

Rows record trainable parameters, forward calls per phase and the VJP rows the boundary answered.
Every finished run is written at once (``graytune.recipes.store``), so the study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from graytune.recipes.store import ResultsStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_kit import first_items, lr_grid, next_rate, pick_lr  # noqa: E402  (beside this script)

TASKS = ("wordnet-category", "wordnet-reverse")
METHODS = ("zero-shot", "prompt", "dga", "adalink", "lga", "prompt-zo", "lora", "full")
ESTIMATOR = {"prompt-zo": "mezo"}
log = logging.getLogger("lm_study")


@dataclass(frozen=True)
class Protocol:
    """What every run of one raw file shares."""

    backbone: str = "smollm2-135m"
    steps: int = 150
    batch_size: int = 8
    eval_every: int = 50
    warmup: float = 0.05
    val_size: int = 100
    test_size: int = 300
    train_size: int | None = None


SMOKE = Protocol(steps=4, batch_size=4, eval_every=2, val_size=8, test_size=8, train_size=32)


class Runner:
    """One task's data, opened once; ``run`` trains one method at one rate and seed."""

    def __init__(self, task: str, protocol: Protocol) -> None:
        from graytune.data.catalog import load_splits

        self.name, self.protocol = task, protocol
        splits = load_splits(task, train_size=protocol.train_size)
        self.splits = replace(splits, val=first_items(splits.val, protocol.val_size),
                              test=first_items(splits.test, protocol.test_size))

    def run(self, method: str, lr: float | None, seed: int) -> dict[str, Any]:
        from graytune.recipes.run import Opened, make_task, open_for, run_once
        from graytune.train.config import TrainConfig

        p = self.protocol
        started = time.perf_counter()
        handle = open_for(p.backbone, None, method)  # a fresh handle: its exposure is this run's
        task = make_task(self.splits, handle, None)
        config = TrainConfig(lr=lr, max_steps=p.steps, batch_size=p.batch_size, eval_every=p.eval_every,
                             warmup=p.warmup, seed=seed, zo=ESTIMATOR.get(method))
        row, _ = run_once(Opened(handle, task, self.splits.val, self.splits.test), method, config,
                          score_val=True)
        exposure = handle.exposure
        return {"task": self.name, "method": method, "lr": lr, "seed": seed, "access": row["access"],
                "estimator": ESTIMATOR.get(method), "steps": row["steps"], "best_val": row["best_val"],
                "best_step": row["best_step"], "trainable_parameters": row["trainable_parameters"],
                "curve": [[h["step"], h["val_exact_match"], h["loss"]] for h in row["history"]],
                "test": row["test"], "calls": {k: v for k, v in row["calls"].items()},
                "vjp_rows": exposure.gradient_samples, "vjp_calls": exposure.gradient_queries,
                "step_seconds": row["step_seconds"], "seconds": round(time.perf_counter() - started, 1)}


def study(store: ResultsStore, tasks: list[str], methods: list[str], seeds: list[int], extend: int,
          protocol: Protocol, registry_seeds: bool = False) -> None:
    from graytune.methods import get_method

    runners = {task: Runner(task, protocol) for task in tasks}

    def ensure(task: str, method: str, lr: float | None, seed: int) -> dict[str, Any]:
        row = store.find(task=task, method=method, lr=lr, seed=seed)
        if row is None:
            row = runners[task].run(method, lr, seed)
            store.add(row)
            log.info("%s %s lr %s seed %d: val %.3f (step %d), test %s, %.0f s", task, method, lr, seed,
                     row["best_val"], row["best_step"], {k: round(v, 4) for k, v in row["test"].items()},
                     row["seconds"])
        return row

    for task in tasks:  # 1. a first full table
        for method in methods:
            ensure(task, method, get_method(method).lr, seeds[0])
    for task in tasks:  # 1'. with --registry-seeds, the other seeds at the registry's rate (before any grid)
        for method in methods:
            for seed in seeds[1:] if registry_seeds and get_method(method).lr is not None else []:
                ensure(task, method, get_method(method).lr, seed)
    for task in tasks:  # 2. the rate grids; 3. the seeds
        for method in methods:
            registry = get_method(method).lr
            if registry is None:
                continue
            best = {lr: ensure(task, method, lr, seeds[0])["best_val"] for lr in lr_grid(registry)}
            for _ in range(extend):
                lr, edge = pick_lr(best, registry)
                if not edge:
                    break
                extra = next_rate(best, edge)
                best[extra] = ensure(task, method, extra, seeds[0])["best_val"]
            lr, edge = pick_lr(best, registry)
            log.info("%s %s: lr %g chosen%s", task, method, lr, f" (at the {edge} edge)" if edge else "")
            for seed in seeds[1:]:
                ensure(task, method, lr, seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=Protocol.backbone)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=Protocol.steps)
    parser.add_argument("--seeds", default="0,1,2", help="the first one selects the learning rate")
    parser.add_argument("--extend", type=int, default=1, help="rates tried beyond a grid edge that wins")
    parser.add_argument("--registry-seeds", action="store_true",
                        help="run the other seeds at the registry's rate before the grids (a spread before tuned "
                             "rates; the table marks such rows 'registry only')")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (leave a core to the rest)")
    parser.add_argument("--out", default=None, help="the raw JSON (default docs/lm-raw.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets into a temp folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    protocol = SMOKE if args.smoke else Protocol(backbone=args.backbone, steps=args.steps)
    out = Path(args.out or (Path(tempfile.mkdtemp(prefix="lm-smoke-")) / "lm-raw.json" if args.smoke
                            else "docs/lm-raw.json"))
    store = ResultsStore(out, {"protocol": asdict(protocol), "runs": []},
                         hint="pass the same flags to resume it, or --out another file")
    seeds = [0] if args.smoke else [int(s) for s in args.seeds.split(",")]
    study(store, args.tasks.split(","), args.methods.split(","), seeds, 0 if args.smoke else args.extend,
          protocol, args.registry_seeds)
    log.info("done: %s", out)


if __name__ == "__main__":
    main()
