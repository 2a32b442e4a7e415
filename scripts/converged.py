"""The converged gray-box study (issue 14 item 3): learning rates chosen on validation, long budgets, 3 seeds,
and the gray-box methods base-to-novel.

Run: .venv/bin/python scripts/converged.py [--steps 1000] [--eval-every 50] [--seeds 0,1,2]
     [--tasks text,image,...] [--methods output,dga,...] [--out docs/converged-raw.json]
then .venv/bin/python scripts/converged_table.py (markdown on stdout, docs/figures/converged-*.png).
     .venv/bin/python scripts/converged.py --smoke   # every code path in a minute or two, into a temp folder

Protocol, per task and method:
1. learning-rate selection: seed 0, each rate of ``lr_grid`` (the registry's rate and its neighbours on the
   1-3-10 ladder: ×1/3, ×1, ×3, e.g. full 1e-5/3e-5/1e-4, LoRA 3e-4/1e-3/3e-3), ``--steps`` optimizer steps of
   batch 32 (AdamW, 5 % warm-up then cosine to zero over the whole budget), validation every ``--eval-every``
   steps, the best validated state kept. The rate with the best validation score wins (ties: the one nearer
   the registry's); when it lies at the edge of the rates run, ``--extend`` more rates are tried beyond it.
2. seeds: the chosen rate with every other seed of ``--seeds``; seed 0 is the selection run itself (the same
   configuration), not run twice. Test metrics come from the best validated state, scored once.
3. base-to-novel (tasks ``*-b2n``): the gray-box methods on ``wordnet-supersense:base-to-novel`` and
   ``fashion-mnist:base-to-novel``: train and validation hold base classes only, so the rate is chosen on base
   samples (scored among all classes), never on novel ones; the test split is scored among base and among
   novel classes (harmonic mean of the two).

Every finished run is written at once (atomically, under a lock: ``--tasks`` may split the study across
processes), so an interrupted study resumes where it stopped, and a rerun does only what is missing.
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

from graytune.recipes.store import ProtocolMismatch, ResultsStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_kit import TASKS, first_items, lr_grid, next_rate, pick_lr  # noqa: E402  (beside this script)


@dataclass(frozen=True)
class Protocol:
    """What every run of one raw file shares; a rerun with other values must write elsewhere."""

    steps: int = 1000
    eval_every: int = 50
    batch_size: int = 32
    patience: int = 0
    warmup: float = 0.05
    train_size: int | None = None  # None: each data set's standard split sizes
    eval_size: int | None = None  # None: the whole val and test splits
    plateau_tol: float = 0.01


SMOKE = Protocol(steps=6, eval_every=2, batch_size=8, train_size=48, eval_size=48)
SMOKE_TASKS, SMOKE_METHODS = ["text", "text-b2n"], ["zero-shot", "output", "full"]

log = logging.getLogger("converged")


class Store(ResultsStore):
    """docs/converged-raw.json: the protocol, the tasks as defined when the file began, and one row per run
    (``graytune.recipes.store``: rewritten atomically after every run, under a lock: ``--tasks`` may split the
    study across processes)."""

    def __init__(self, path: Path, protocol: Protocol) -> None:
        blank = {"protocol": asdict(protocol), "tasks": {k: asdict(v) for k, v in TASKS.items()}, "runs": []}
        try:
            super().__init__(path, blank, hint="pass the same flags to resume it, or --out another file")
        except ProtocolMismatch as err:
            raise SystemExit(str(err)) from None
        self.protocol = protocol


# --- runs ------------------------------------------------------------------------------------------------------

class TaskRunner:
    """One task's data, task object and per-method handles, opened once and shared by its runs."""

    def __init__(self, name: str, protocol: Protocol, device: str | None) -> None:
        from graytune.data.catalog import load_splits

        self.name, self.defn, self.protocol, self.device = name, TASKS[name], protocol, device
        splits = load_splits(self.defn.data, train_size=protocol.train_size)
        if protocol.eval_size:  # smoke: the first items of each (already shuffled) split
            splits = replace(splits, val=first_items(splits.val, protocol.eval_size),
                             test=first_items(splits.test, protocol.eval_size))
        self.splits, self.task, self.handles = splits, None, {}

    def handle(self, method: str) -> Any:
        from graytune.recipes.run import make_task, open_for

        if method not in self.handles:  # each method at its own level, with its own grants
            self.handles[method] = open_for(self.defn.backbone, None, method, device=self.device)
            self.task = self.task or make_task(self.splits, self.handles[method], self.defn.image_size)
        return self.handles[method]

    def release(self, method: str) -> None:
        """Close ``method``'s handle once its runs are done."""
        self.handles.pop(method, None)

    def run(self, method: str, lr: float | None, seed: int) -> dict[str, Any]:
        """Train ``method`` at ``lr`` with ``seed`` (or score it untrained), test the best validated state."""
        from graytune.methods import get_method
        from graytune.recipes.run import Opened, run_once
        from graytune.train.config import TrainConfig

        handle, p = self.handle(method), self.protocol
        config = TrainConfig(lr=lr, max_steps=p.steps, batch_size=p.batch_size, seed=seed,
                             eval_every=p.eval_every, patience=p.patience, warmup=p.warmup)
        started = time.perf_counter()
        run, _ = run_once(Opened(handle, self.task, self.splits.val, self.splits.test), method, config,
                          device=self.device, score_val=True)
        row = study_row(run, self.name, lr, self.task.primary, trained=bool(get_method(method).slots))
        row["seconds"] = round(time.perf_counter() - started, 1)
        return row


def study_row(run: dict[str, Any], task: str, lr: float | None, primary: str, trained: bool) -> dict[str, Any]:
    """``run_once``'s row as the raw file has always held it (its keys, in their order, ``seconds`` to add):
    ``lr`` as asked (None for zero-shot), ``curve`` ``[[step, val primary, loss], ...]``."""
    row: dict[str, Any] = {"task": task, "method": run["method"], "lr": lr, "seed": run["seed"],
                           "access": run["access"], "primary": primary, "steps": run["steps"]}
    if trained:
        row.update(stopped=run["stopped"], best_val=run["best_val"], best_step=run["best_step"],
                   step_seconds=run["step_seconds"], trainable_parameters=run["trainable_parameters"],
                   curve=[[h["step"], h[f"val_{primary}"], h["loss"]] for h in run["history"]])
    else:
        row.update(best_val=run["best_val"], best_step=0, trainable_parameters=0, curve=[])
    row["test"] = run["test"]
    return row


def study(store: Store, tasks: list[str], methods: list[str] | None, seeds: list[int], extend: int,
          device: str | None = None) -> None:
    from graytune.methods import get_method

    for name in tasks:
        chosen_methods = [m for m in TASKS[name].methods if methods is None or m in methods]
        if not chosen_methods:
            continue
        runner = TaskRunner(name, store.protocol, device)

        def ensure(method: str, lr: float | None, seed: int) -> dict[str, Any]:
            row = store.find(task=name, method=method, lr=lr, seed=seed)
            if row is None:
                row = runner.run(method, lr, seed)
                store.add(row)
                log.info("%s %s lr %s seed %d: val %.4f (step %d), test %s, %.0f s", name, method, lr, seed,
                         row["best_val"], row["best_step"],
                         {k: round(v, 4) for k, v in row["test"].items()}, row["seconds"])
            return row

        for method in chosen_methods:
            registry = get_method(method).lr
            if registry is None:  # zero-shot: deterministic, scored once
                ensure(method, None, seeds[0])
                runner.release(method)
                continue
            best = {lr: ensure(method, lr, seeds[0])["best_val"] for lr in lr_grid(registry)}
            for _ in range(extend):
                lr, edge = pick_lr(best, registry)
                if not edge:
                    break
                extra = next_rate(best, edge)
                best[extra] = ensure(method, extra, seeds[0])["best_val"]
            lr, edge = pick_lr(best, registry)
            log.info("%s %s: lr %g chosen%s", name, method, lr, f" (at the {edge} edge)" if edge else "")
            for seed in seeds[1:]:
                ensure(method, lr, seed)
            runner.release(method)  # one backbone copy in memory at a time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=Protocol.steps, help="optimizer steps per run")
    parser.add_argument("--eval-every", type=int, default=Protocol.eval_every, help="validate every N steps")
    parser.add_argument("--patience", type=int, default=0, help="stop after N validations without gain; 0: never")
    parser.add_argument("--seeds", default="0,1,2", help="the first one selects the learning rate")
    parser.add_argument("--extend", type=int, default=1,
                        help="rates tried beyond a grid edge when the best lies there (0: the 3-rate grid only)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"of {', '.join(TASKS)}")
    parser.add_argument("--methods", default="", help="only these methods (default: each task's list)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when present)")
    parser.add_argument("--out", default=None, help="the raw JSON (default docs/converged-raw.json; "
                        "with --smoke a temp folder)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"{SMOKE.steps} steps, {SMOKE.train_size} train and {SMOKE.eval_size} val/test items, "
                             f"tasks {','.join(SMOKE_TASKS)}, methods {','.join(SMOKE_METHODS)}; "
                             "writes into a temp folder (unless --out) and renders it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    if args.smoke:
        protocol = SMOKE
        tasks, methods, seeds = SMOKE_TASKS, SMOKE_METHODS, [0, 1]
        out = Path(args.out or Path(tempfile.mkdtemp(prefix="converged-smoke-")) / "converged-raw.json")
    else:
        protocol = Protocol(steps=args.steps, eval_every=args.eval_every, patience=args.patience)
        tasks = args.tasks.split(",")
        methods = args.methods.split(",") if args.methods else None
        seeds = [int(s) for s in args.seeds.split(",")]
        out = Path(args.out or "docs/converged-raw.json")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    store = Store(out, protocol)
    study(store, tasks, methods, seeds, args.extend, args.device)
    log.info("study done in %.0f s: %s", time.perf_counter() - started, out)
    if args.smoke:
        import converged_table  # the renderer beside this script (it does not import this one)

        converged_table.main(["--raw", str(out), "--figures", str(out.parent)])
        log.info("smoke done in %.0f s (raw file, tables and figures in %s)", time.perf_counter() - started,
                 out.parent)


if __name__ == "__main__":
    main()
