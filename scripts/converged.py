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
import fcntl
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

BRIDGE = "bridge:efficientnet-lite0+minilm"
GRAY = ["zero-shot", "output", "output-mlp", "dga", "dga-id", "lga", "adalink"]
WHITE = ["lora", "full"]
B2N = ["zero-shot", "output", "dga", "dga-id", "lga", "adalink"]


@dataclass(frozen=True)
class TaskDef:
    """One task of the study: ``results`` names its equal-small-budget setting in docs/results-raw.json."""

    backbone: str
    data: str
    image_size: int | None
    methods: tuple[str, ...]
    results: str | None = None


TASKS: dict[str, TaskDef] = {
    "text": TaskDef("minilm", "wordnet-supersense", None, (*GRAY, "adalink+output", *WHITE), "text"),
    "image": TaskDef(BRIDGE, "fashion-mnist", 64, (*GRAY, "adalink+output", *WHITE), "image"),
    "image-text": TaskDef(BRIDGE, "tuxpaint", 128, (*GRAY, "adalink+output", *WHITE), "image-text"),
    # one image tower: adalink has no input tokens to adapt there, and dga-id's gate is on text tokens only
    "sketch": TaskDef(BRIDGE, "tuxpaint-sketch", 96, ("zero-shot", "output", "output-mlp", "dga", "lga", *WHITE),
                      "sketch"),
    "text-b2n": TaskDef("minilm", "wordnet-supersense:base-to-novel", None, tuple(B2N)),
    "image-b2n": TaskDef(BRIDGE, "fashion-mnist:base-to-novel", 64, tuple(B2N)),
}


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


# --- the logic worth a test: the grid, the pick, the plateau -------------------------------------------------

def ladder_rate(k: int) -> float:
    """The k-th rate of the 1-3-10 ladder: even k is 10^(k/2), odd k three times 10^((k-1)/2)."""
    return float(f"{(1 if k % 2 == 0 else 3) * 10.0 ** (k // 2):.0e}")


def _nearest(lr: float) -> int:
    """The ladder position nearest ``lr`` on a log scale."""
    k = round(2 * math.log10(lr))
    return min((k - 1, k, k + 1), key=lambda j: abs(math.log(ladder_rate(j) / lr)))


def lr_grid(registry: float, each_side: int = 1) -> list[float]:
    """The registry's rate rounded onto the 1-3-10 ladder, with ``each_side`` neighbours below and above.

    >>> lr_grid(1e-3), lr_grid(3e-5)
    ([0.0003, 0.001, 0.003], [1e-05, 3e-05, 0.0001])
    """
    k = _nearest(registry)
    return [ladder_rate(j) for j in range(k - each_side, k + each_side + 1)]


def pick_lr(best_val: dict[float, float], registry: float) -> tuple[float, str]:
    """The rate with the best validation score, and ``"low"``/``"high"`` when it is the lowest/highest run
    ("" inside the grid). Ties (within 1e-9) go to the rate nearer the registry's, then to the lower."""
    top = max(best_val.values())
    tied = [lr for lr, v in best_val.items() if v >= top - 1e-9]
    chosen = min(tied, key=lambda lr: (abs(math.log(lr / registry)), lr))
    rates = sorted(best_val)
    edge = "low" if chosen == rates[0] and len(rates) > 1 else "high" if chosen == rates[-1] and len(rates) > 1 else ""
    return chosen, edge


def next_rate(best_val: dict[float, float], edge: str) -> float:
    """The ladder rate one beyond the edge the pick sits at."""
    end = min(best_val) if edge == "low" else max(best_val)
    return ladder_rate(_nearest(end) + (-1 if edge == "low" else 1))


def plateau(curve: list[tuple[int, float]], tol: float = 0.01) -> dict[str, Any]:
    """Where a validation curve ``[(step, value), ...]`` levels off.

    ``step``: the first validation within ``tol`` of the curve's best; ``rising``: whether the last quarter of
    the steps still beat everything before it by more than ``tol`` (then the budget did not reach a plateau).

    >>> plateau([(10, .5), (20, .7), (30, .705), (40, .70)])
    {'step': 20, 'best': 0.705, 'rising': False}
    """
    if not curve:
        return {"step": 0, "best": math.nan, "rising": False}
    best = max(v for _, v in curve)
    first = next(s for s, v in curve if v >= best - tol)
    last_step = curve[-1][0]
    cut = last_step - last_step / 4
    before = [v for s, v in curve if s <= cut]
    after = [v for s, v in curve if s > cut]
    rising = bool(before and after and max(after) > max(before) + tol)
    return {"step": first, "best": best, "rising": rising}


# --- the raw file ----------------------------------------------------------------------------------------------

class Store:
    """The raw JSON, rewritten atomically after every finished run; each write rereads it under a lock, so
    processes running different ``--tasks`` side by side keep each other's rows."""

    def __init__(self, path: Path, protocol: Protocol) -> None:
        self.path, self.protocol = path, protocol
        self.data = self._read()
        wanted = asdict(protocol)
        if self.data["protocol"] != wanted:
            diff = {k: (self.data["protocol"].get(k), v) for k, v in wanted.items()
                    if self.data["protocol"].get(k) != v}
            raise SystemExit(f"{path} holds runs of another protocol ("
                             + ", ".join(f"{k} {a} there, {b} now" for k, (a, b) in diff.items())
                             + "); pass the same flags to resume it, or --out another file")

    def _read(self) -> dict[str, Any]:
        if self.path.is_file():
            return json.loads(self.path.read_text())
        return {"protocol": asdict(self.protocol), "tasks": {k: asdict(v) for k, v in TASKS.items()}, "runs": []}

    def find(self, **key: Any) -> dict[str, Any] | None:
        return next((r for r in self.data["runs"] if all(r.get(k) == v for k, v in key.items())), None)

    def add(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.data = self._read()
            self.data["runs"].append(row)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            tmp.replace(self.path)


# --- runs ------------------------------------------------------------------------------------------------------

class TaskRunner:
    """One task's data, task object and per-method handles, opened once and shared by its runs."""

    def __init__(self, name: str, protocol: Protocol, device: str | None) -> None:
        from graytune.data.catalog import load_splits

        self.name, self.defn, self.protocol, self.device = name, TASKS[name], protocol, device
        splits = load_splits(self.defn.data, train_size=protocol.train_size)
        if protocol.eval_size:  # smoke: the first items of each (already shuffled) split
            splits = replace(splits, val=_head(splits.val, protocol.eval_size),
                             test=_head(splits.test, protocol.eval_size))
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
        from graytune.model import AdaptedModel
        from graytune.recipes.run import place_model
        from graytune.train.trainer import TrainConfig, fit, seed_everything

        spec, handle, p = get_method(method), self.handle(method), self.protocol
        started = time.perf_counter()
        seed_everything(seed)
        model = place_model(AdaptedModel.build(handle, method), self.device)
        row: dict[str, Any] = {"task": self.name, "method": method, "lr": lr, "seed": seed,
                               "access": spec.min_access.label, "primary": self.task.primary}
        if spec.slots:
            config = TrainConfig(lr=lr, max_steps=p.steps, batch_size=p.batch_size, seed=seed,
                                 eval_every=p.eval_every, patience=p.patience, warmup=p.warmup)
            result = fit(model, self.task, self.splits.val, config, progress=False)
            key = f"val_{self.task.primary}"
            row.update(steps=result.steps, stopped=result.stopped, best_val=result.best_metric,
                       best_step=result.best_step, step_seconds=result.step_seconds,
                       trainable_parameters=model.trainable_parameters(),
                       curve=[[h["step"], h[key], h["loss"]] for h in result.history])
        else:
            row.update(steps=0, best_val=self.task.evaluate(model, self.splits.val)[self.task.primary],
                       best_step=0, trainable_parameters=0, curve=[])
        row["test"] = self.task.evaluate(model, self.splits.test)
        row["seconds"] = round(time.perf_counter() - started, 1)
        return row


def _head(data: Any, n: int) -> Any:
    return data.subset(range(min(n, len(data))))


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
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import converged_table

        converged_table.main(["--raw", str(out), "--figures", str(out.parent)])
        log.info("smoke done in %.0f s (raw file, tables and figures in %s)", time.perf_counter() - started,
                 out.parent)


if __name__ == "__main__":
    main()
