"""The exposure study (docs/exposure.md): every rung of the access ladder on two real tasks, what each run
revealed, the zeroth-order methods' accuracy against calls, and the audit's extraction fidelity.

Run: .venv/bin/python scripts/exposure.py [--seeds 0,1,2] [--parts ladder,curves,audits]
     [--audit-budgets 1000,10000] [--out docs/exposure-raw.json]
then .venv/bin/python scripts/exposure_table.py (renders docs/exposure.md and docs/figures/exposure-*.png).
Every finished run is written at once (atomically), so an interrupted study resumes where it stopped;
rerunning with more seeds or budgets adds only what is missing.

Protocol:
- ladder: each method at its own (least) access level with the registry's learning rate, batch 32,
  AdamW with warm-up and cosine decay; gradient methods 60 steps (docs/results.md's budget); the
  zeroth-order ones (dga-zo, prompt-zo) until ``ZO_FACTOR`` times the forward calls of the same seed's
  DGA run (``--max-calls``), BlackVIP's SPSA-GC with q = 5, eps = 0.01, for the steps that budget pays
  for (the warm-up and cosine schedule span them); validation every ``EVAL_EVERY`` steps, best validation
  kept, test scored once.
- controls: output adapters alone for as many steps as dga-zo took (its output adapters step once per
  zeroth-order step, twice ``output``'s 60), so that its gain over ``output`` is read fairly.
- curves: dga-zo on the text task with SPSA, SPSA-GC and ZIP at the same call budget, validation every
  ``EVAL_EVERY`` steps: accuracy against training calls (SPSA-GC's curves are the ladder's runs).
- audits: ``graytune audit`` at black-box, dark-gray and light-gray on each task's backbone, 16 rows a call,
  with the attacks of issue 32 (``AUDIT_VERSION`` 2: finite differences at black-box, per-token VJPs with
  several cotangents at dark-gray, quotas in the server's units). Rows of earlier audits stay in the raw
  file as they were (no ``version``), for docs/exposure.md to say what changed; they are not rerun.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch

from graytune.audit import AuditConfig, run_audit
from graytune.audit.config import ATTACKS
from graytune.data.catalog import load_splits
from graytune.methods import get_method
from graytune.recipes.run import Opened, make_task, open_for, run_once
from graytune.recipes.store import ProtocolMismatch, ResultsStore
from graytune.train.config import TrainConfig

#: (name, backbone, data set, image size): the two real tasks the issue names
TASKS = [
    ("text", "minilm", "wordnet-supersense", None),
    ("image-text", "bridge:efficientnet-lite0+minilm", "tuxpaint", 128),
]
#: the ladder, bottom rung first (DGA before the zeroth-order runs: their budget is a multiple of its calls)
LADDER = ["zero-shot", "output", "dga", "dga-zo", "prompt-zo", "lga", "lga-deep", "adalink", "lora", "full"]
ZO_METHODS = ("dga-zo", "prompt-zo")
CURVE_ESTIMATORS = ("spsa", "zip")  # spsa-gc: the ladder's dga-zo runs
STEPS, BATCH, EVAL_EVERY, ZO_FACTOR, ZO_Q = 60, 32, 10, 20, 5
LEVELS = ("black-box", "dark-gray", "light-gray")
#: the audit's attacks (issue 32); rows without a version are the earlier audits'
AUDIT_VERSION = 2
PARTS = ("ladder", "curves", "audits", "controls")

log = logging.getLogger("exposure")


def run_method(backbone: str, data: str, size: int | None, method: str, seed: int, max_calls: int = 0,
               estimator: str | None = None, calls_per_loss: int = 2, steps: int = STEPS) -> dict[str, Any]:
    """Train ``method`` (or score it untrained) and record its accuracy, calls and exposure."""
    splits = load_splits(data)
    spec = get_method(method)
    handle = open_for(backbone, None, method)
    task = make_task(splits, handle, size)
    zo = method in ZO_METHODS
    # a zeroth-order step is 2q loss evaluations, each the calls of one DGA step: the schedule (warm-up,
    # cosine decay) spans exactly the steps the budget pays for, and max_calls guards it
    steps = max_calls // (2 * ZO_Q * calls_per_loss) if zo else steps
    config = TrainConfig(lr=spec.lr, max_steps=steps, batch_size=BATCH, seed=seed, eval_every=EVAL_EVERY,
                         max_calls=max_calls, zo=estimator if zo else None, zo_q=ZO_Q if zo else None)
    started = time.perf_counter()
    run, _ = run_once(Opened(handle, task, splits.val, splits.test), method, config, score_val=True)
    row: dict[str, Any] = {"method": method, "access": run["access"], "seed": seed, "estimator": estimator}
    if spec.slots:
        row.update(steps=run["steps"], stopped=run["stopped"], lr=run["lr"], calls=fit_calls(run),
                   best_val=run["best_val"], best_step=run["best_step"],
                   trainable_parameters=run["trainable_parameters"],
                   curve=[(h["train_calls"], h[f"val_{task.primary}"]) for h in run["history"]])
    else:
        row.update(steps=0, trainable_parameters=0, best_val=run["best_val"])
    row["test"] = run["test"]
    row["primary"] = task.primary
    row["seconds"] = round(time.perf_counter() - started, 1)
    row["exposure"] = handle.exposure.to_dict()  # validation and test calls included; ``calls`` has them apart
    return row


def fit_calls(run: dict[str, Any]) -> dict[str, int]:
    """The training and validation calls as ``fit`` counts them (the raw file's ``calls``): ``run_once``'s
    without the test's, and ``step``, the calls of one training step. ``run_once`` leaves ``step`` out; every
    step of this protocol costs the same (one DGA step's calls, or 2q times them for a zeroth-order step, whose
    budget pays for whole steps), so it is the training calls over the steps."""
    calls = {k: v for k, v in run["calls"].items() if not k.startswith("test")}
    return {**calls, "step": calls["train"] // run["steps"] if run["steps"] else 0}


class Store(ResultsStore):
    """docs/exposure-raw.json: a list of rows per part (``PARTS``) and the protocol
    (``graytune.recipes.store``: rewritten atomically after every finished unit of work).

    Parts may run in separate processes at once (``--parts audits`` beside ``--parts ladder``): each write
    rereads the file under a lock and adds its row, so neither process drops the other's rows.
    """

    def __init__(self, path: Path) -> None:
        protocol = {"steps": STEPS, "batch_size": BATCH, "eval_every": EVAL_EVERY, "zo_factor": ZO_FACTOR,
                    "zo_estimator": "spsa-gc", "tasks": TASKS}
        try:
            super().__init__(path, {**{part: [] for part in PARTS}, "protocol": protocol},
                             hint="the protocol is this script's constants: restore them, or --out another file")
        except ProtocolMismatch as err:
            raise SystemExit(str(err)) from None


def zo_budget(store: Store, task: str, seed: int) -> tuple[int, int]:
    """``ZO_FACTOR`` times the training calls of the seed's DGA run, and DGA's calls per step (one loss)."""
    dga = store.find("ladder", task=task, method="dga", seed=seed)
    assert dga is not None, "the DGA run comes first"
    return ZO_FACTOR * dga["calls"]["train"], dga["calls"]["train"] // dga["steps"]


def ladder(store: Store, seeds: list[int], methods: list[str] = LADDER) -> None:
    for name, backbone, data, size in TASKS:
        for seed in seeds:
            for method in methods:
                if store.find("ladder", task=name, method=method, seed=seed):
                    continue
                budget, per_loss = zo_budget(store, name, seed) if method in ZO_METHODS else (0, 2)
                row = run_method(backbone, data, size, method, seed, budget,
                                 "spsa-gc" if method in ZO_METHODS else None, per_loss)
                log.info("%s seed %d %s: %s in %.0f s", name, seed, method, row["test"], row["seconds"])
                store.add({**row, "task": name, "backbone": backbone, "data": data, "image_size": size}, "ladder")


def controls(store: Store, seeds: list[int]) -> None:
    """Output adapters alone for as many steps as dga-zo's (whose output adapters step once per zeroth-order
    step): what of dga-zo's gain over ``output`` comes from its input adapters and not from more steps."""
    for name, backbone, data, size in TASKS:
        for seed in seeds:
            if store.find("controls", task=name, method="output", seed=seed):
                continue
            zo = store.find("ladder", task=name, method="dga-zo", seed=seed)
            if zo is None:
                log.info("%s seed %d: no dga-zo run to match; skipped", name, seed)
                continue
            row = run_method(backbone, data, size, "output", seed, steps=zo["steps"])
            log.info("%s seed %d output for %d steps: %s", name, seed, zo["steps"], row["test"])
            store.add({**row, "task": name, "backbone": backbone, "data": data, "image_size": size}, "controls")


def curves(store: Store, seeds: list[int], estimators: list[str]) -> None:
    name, backbone, data, size = TASKS[0]
    for seed in seeds:
        for estimator in estimators:
            if store.find("curves", task=name, estimator=estimator, seed=seed):
                continue
            budget, per_loss = zo_budget(store, name, seed)
            row = run_method(backbone, data, size, "dga-zo", seed, budget, estimator, per_loss)
            log.info("%s seed %d dga-zo/%s: %s in %.0f s", name, seed, estimator, row["test"], row["seconds"])
            store.add({**row, "task": name, "backbone": backbone, "data": data}, "curves")


def audits(store: Store, budgets: list[int], tasks: list[str], levels: tuple[str, ...] = LEVELS,
           attacks: tuple[str, ...] = ATTACKS, progress: bool = False) -> None:
    for budget in budgets:  # every task at the smaller budget first
        for name, backbone, _data, _size in TASKS:
            if name not in tasks or store.find("audits", task=name, budget=budget, version=AUDIT_VERSION):
                continue
            report = run_audit(backbone, AuditConfig(levels=levels, budget=budget, attacks=attacks), progress=progress)
            log.info("%s audit at %d calls: %.0f s", name, budget, report.data["seconds"])
            store.add({"task": name, "backbone": backbone, "budget": budget, "version": AUDIT_VERSION,
                       "attacks": list(attacks), "threads": torch.get_num_threads(), "report": report.data}, "audits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--parts", default="ladder,controls,curves,audits")
    parser.add_argument("--audit-budgets", default="1000,10000")
    parser.add_argument("--audit-tasks", default=",".join(t[0] for t in TASKS), help="tasks whose backbone to audit")
    parser.add_argument("--audit-levels", default=",".join(LEVELS),
                        help="levels each audit attacks (light-gray runs dark-gray's attack: its curve is the same)")
    parser.add_argument("--audit-attacks", default=",".join(ATTACKS),
                        help="extraction attacks each audit runs (the Jacobian attacks always run)")
    parser.add_argument("--audit-progress", action="store_true",
                        help="the audit's progress bars on stderr (a long audit's rate and ETA in its log)")
    parser.add_argument("--methods", default=",".join(LADDER), help="ladder methods to run (default: all)")
    parser.add_argument("--estimators", default=",".join(CURVE_ESTIMATORS), help="curves: estimators beside spsa-gc")
    parser.add_argument("--out", default="docs/exposure-raw.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    store = Store(Path(args.out))
    seeds = [int(s) for s in args.seeds.split(",")]
    parts = args.parts.split(",")
    if "ladder" in parts:
        chosen = set(args.methods.split(",")) | ({"dga"} if set(ZO_METHODS) & set(args.methods.split(",")) else set())
        ladder(store, seeds, [m for m in LADDER if m in chosen])  # the zeroth-order budget needs DGA's calls
    if "controls" in parts:
        controls(store, seeds)
    if "curves" in parts:
        ladder(store, seeds, ["dga"])  # the curves' budget is a multiple of DGA's calls
        curves(store, seeds, args.estimators.split(","))
    if "audits" in parts:
        audits(store, [int(b) for b in args.audit_budgets.split(",")], args.audit_tasks.split(","),
               tuple(args.audit_levels.split(",")), tuple(args.audit_attacks.split(",")), args.audit_progress)


if __name__ == "__main__":
    main()
