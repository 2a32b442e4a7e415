"""TransMiter's weak→strong claim on a real text pair: MiniLM (weak) → all-mpnet-base-v2 (strong), WordNet
gloss → supersense, base-to-novel (5 base / 5 novel classes), 3 seeds; or Debian fortunes by topic
(``--data fortunes``: 4 base / 4 novel topics).

Run: .venv/bin/python scripts/transmiter_text.py [--data wordnet-supersense] [--seeds 0,1,2] [--out RAW]
then .venv/bin/python scripts/transmiter_text_table.py [--raw RAW] > table.md   (and its figure in docs/figures)
     .venv/bin/python scripts/transmiter_text.py --smoke   # every row on a tiny subset, into a temp folder
RAW defaults to docs/transmiter-text-raw.json for WordNet and docs/transmiter-text-fortunes-raw.json for fortunes.
It first runs ``scripts/install_mpnet.py`` (idempotent: an installed folder is only re-verified by SHA-256).

Rows, per seed (test: every test text of all classes, 3,000 glosses for WordNet; base items scored among the
base classes, novel items among the novel ones, and their harmonic mean):
- ``weak_zs``, ``strong_zs``: MiniLM and MPNet zero-shot (class prompts through the text tower);
- ``weak_ft``, ``strong_ft``: each with an output adapter (``--ft-method``) trained on the base classes for the
  same budget (``--ft-steps`` of batch 32, the method's registry rate, best validated state kept): the
  teacher and the upper bound;
- ``eft``: strong zero-shot + (weak fine-tuned − weak zero-shot) scores (``graytune.transfer.eft``);
- ``tm``: TransMiter (auxiliary names drawn as ``--aux-draw`` says: ``balanced`` by default, ``concrete`` the
  first tables' draw; ``graytune.transfer.classes``) extracted from ``weak_ft`` on the base-only unlabeled pool
  (the base-to-novel training texts, labels unused: no novel-class text before test), noise one coin per batch
  (the authors'), β = 500, moved to MPNet;
- ``tm_plus``: ``tm`` fine-tuned with ``--shots`` labels per base class for ``--plus-steps`` optimizer steps
  (batch 128; validation on the base val split after each pass, best kept);
- ``tm_all_pool``: extraction and transfer on the training texts of all classes (transductive: novel texts
  seen unlabeled), the protocol of ``scripts/transmiter_results.py``;
- ablations of ``tm``: ``no_basis_change`` (the weak adapter on MPNet's scores), ``no_aux`` (M = the task
  classes only), ``noise_per_sample``, ``beta_per_sample`` (β = c·N at the pool's N), and the transfer on the
  first ``--small-pool`` of the pool with β fixed (``beta_fixed_small``) and with β = c·N (``beta_per_sample_small``).

``--reuse OLD_RAW`` copies the rows that see no auxiliary name (``DRAW_FREE``) from a raw file drawn otherwise;
the teacher is trained again all the same, and its gap to the copied ``weak_ft`` row is recorded.

Frozen backbones' embeddings depend only on their weights, so each text is embedded once per backbone and kept
in ``--cache`` (keyed by the spec fingerprint); fine-tuned adapters are kept there too. Every finished row is
written at once, atomically, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import install_mpnet  # noqa: E402  (a script beside this one)
from study_kit import first_items  # noqa: E402

from graytune.recipes.store import ProtocolMismatch, ResultsStore  # noqa: E402

WEAK = "minilm"
#: the text sets the study runs on, each with its raw file (the pair separates on both: zero-shot test accuracy
#: MiniLM 61.4 % vs MPNet 68.2 % on WordNet, 71.9 % vs 79.0 % on fortunes)
RAW = {"wordnet-supersense": "docs/transmiter-text-raw.json", "fortunes": "docs/transmiter-text-fortunes-raw.json"}
CACHE = Path("~/.cache/graytune/transmiter-text").expanduser()
log = logging.getLogger("transmiter_text")


@dataclass(frozen=True)
class Protocol:
    """What every row of one raw file shares; a rerun with other values must write elsewhere."""

    ft_method: str = "output"
    ft_steps: int = 300
    ft_batch: int = 32
    classes: int = 1024  # M: task + auxiliary classes
    extract_epochs: int = 10
    noise_per: str = "batch"
    beta: float = 500.0
    beta_per_sample: float = 0.625  # 500 at N = 800 (16 shots × 50 base classes, a typical pool of the paper)
    small_pool: float = 0.25
    shots: int = 16
    plus_steps: int = 300
    aux_draw: str = "balanced"  # how the auxiliary names are drawn (graytune.transfer.classes.DRAWS)
    train_size: int | None = None  # None: the standard splits (2,000 train of which 992 base, 500 val, 3,000 test)
    val_size: int | None = None
    test_size: int | None = None


#: every row of a seed, in the renderer's order
ROWS = ("weak_zs", "strong_zs", "weak_ft", "strong_ft", "eft", "tm", "tm_plus", "tm_all_pool", "no_basis_change",
        "no_aux", "noise_per_sample", "beta_per_sample", "beta_fixed_small", "beta_per_sample_small")
#: the rows that never score an auxiliary name: the same whatever the draw (``--reuse`` copies them)
DRAW_FREE = ("weak_zs", "strong_zs", "weak_ft", "strong_ft", "eft", "no_aux")
SMOKE = Protocol(ft_steps=4, ft_batch=16, classes=64, extract_epochs=2, shots=4, plus_steps=5, train_size=200,
                 val_size=50, test_size=100)


class CachedText:
    """A frozen text encoder whose embeddings are computed once per text and kept on disk; ``encode_text`` only."""

    def __init__(self, handle: Any, folder: Path, name: str, batch_size: int = 64) -> None:
        self.handle, self.batch_size, self.seconds = handle, batch_size, 0.0
        self.path = folder / f"{name}-{handle.spec.fingerprint[:16]}.pt"
        self.cache: dict[str, torch.Tensor] = {}
        if self.path.is_file():
            saved = torch.load(self.path, weights_only=True)
            self.cache = dict(zip(saved["texts"], saved["embeds"]))
        self.saved = len(self.cache)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        from tqdm.auto import tqdm

        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        start = time.perf_counter()
        with tqdm(total=len(missing), desc=self.path.stem[:24], unit="text", disable=len(missing) < 256) as bar:
            for i in range(0, len(missing), self.batch_size):
                chunk = missing[i:i + self.batch_size]
                self.cache.update(zip(chunk, self.handle.encode_text(chunk).float().cpu()))
                bar.update(len(chunk))
        self.seconds += time.perf_counter() - start
        if len(self.cache) - self.saved >= 256:  # kept on disk every 256 new texts (``class_scores`` asks for
            self.save()                          # 128 at a time), so an interrupted seed does not embed them again
        return torch.stack([self.cache[t] for t in texts]) if texts else torch.zeros(0)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise TypeError("CachedText embeds texts only")

    def save(self) -> None:
        if len(self.cache) == self.saved:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"texts": list(self.cache), "embeds": torch.stack(list(self.cache.values()))}, tmp)
        tmp.replace(self.path)
        self.saved = len(self.cache)


class Store(ResultsStore):
    """A raw file of this study (``graytune.recipes.store``: rewritten atomically after every finished row): the
    protocol and what it ran with, then ``seeds``: seed -> row name -> row. One file holds one data set's rows."""

    def __init__(self, path: Path, head: dict[str, Any]) -> None:
        try:
            super().__init__(path, {**head, "seeds": {}}, header={k: v for k, v in head.items() if k != "protocol"},
                             hint="pass the same flags to resume it, or --out another file")
        except ProtocolMismatch as err:
            raise SystemExit(str(err)) from None
        if self.data.get("data", head["data"]) != head["data"]:
            raise SystemExit(f"{path} holds rows on {self.data['data']}, not {head['data']}; pass --data "
                             f"{self.data['data'].split(':')[0]} to resume it, or --out another file")

    def has(self, seed: int, *keys: str) -> bool:
        return all(k in self.data["seeds"].get(str(seed), {}) for k in keys)

    def put(self, seed: int, key: str, row: dict[str, Any]) -> None:
        log.info("seed %d %s: %s", seed, key, {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
        self.update(lambda data: data["seeds"].setdefault(str(seed), {}).update({key: row}))


def metrics(scores: torch.Tensor, labels: torch.Tensor, splits: Any) -> dict[str, float]:
    """Base, novel (each among its own classes), their harmonic mean, and accuracy among all 10 (0–1)."""
    from graytune.recipes.transmiter import base_novel_accuracy

    out = base_novel_accuracy(scores, labels, splits.eval_splits["base"], splits.eval_splits["novel"])
    return {**out, "accuracy": float((scores.argmax(1) == labels).float().mean())}


class Experiment:
    """One protocol's data, backbones and caches, shared by the seeds."""

    def __init__(self, protocol: Protocol, strong_id: str, cache: Path, store: Store, progress: bool,
                 data: str = "wordnet-supersense") -> None:
        from graytune.access import memoize
        from graytune.data.catalog import load_splits
        from graytune.recipes.run import open_for
        from graytune.recipes.transmiter import load_queries

        self.p, self.strong_id, self.cache, self.store, self.progress = protocol, strong_id, cache, store, progress
        self.data = data
        b2n = load_splits(f"{data}:base-to-novel", train_size=protocol.train_size)
        self.splits = replace(b2n, val=first_items(b2n.val, protocol.val_size),
                              test=first_items(b2n.test, protocol.test_size))
        whole = load_splits(data, train_size=protocol.train_size).train  # the same texts, novel classes kept
        self.names, self.prompt = list(self.splits.train.class_names), self.splits.prompt
        self.handles = {WEAK: open_for(WEAK, None, protocol.ft_method), strong_id: open_for(strong_id, None,
                                                                                            protocol.ft_method)}
        # the fine-tuned rows' frozen forwards, once per text across seeds (their output adapters train on them)
        self.memos = {name: memoize(h) for name, h in self.handles.items()}
        self.weak = CachedText(self.handles[WEAK], cache, "minilm")
        self.strong = CachedText(self.handles[strong_id], cache, "mpnet")
        handle = self.handles[WEAK]
        self.q = load_queries(self.splits, handle, unlabeled=whole, shots=protocol.shots, base_only=True)
        self.pool_all = load_queries(self.splits, handle, unlabeled=whole, progress=False).unlabeled
        self.test_labels = labels = self.q.test_labels
        store.header["sizes"] = {"pool_base": len(self.q.unlabeled), "pool_all": len(self.pool_all),
                                 "few_shot": len(self.q.train), "val": len(self.q.val), "test": len(labels),
                                 "base_classes": list(self.splits.eval_splits["base"]), "classes": len(self.names)}

    def scores(self, encoder: Any, texts: Sequence[str]) -> torch.Tensor:
        from graytune.transfer.transmiter import class_scores

        return class_scores(encoder, texts, self.names, self.prompt, progress=self.progress)

    def fine_tuned(self, backbone: str, seed: int) -> tuple[Any, dict[str, Any]]:
        """The backbone with a ``ft_method`` adapter trained on the base classes (kept in the cache, reloaded)."""
        from graytune.artifacts import load_adapter, read_config, save_adapter
        from graytune.methods import get_method
        from graytune.recipes.run import Opened, make_task, run_once
        from graytune.train.config import TrainConfig

        handle, memo, p = self.handles[backbone], self.memos[backbone], self.p
        what = [backbone, handle.spec.fingerprint, self.data, p.ft_method, p.ft_steps, p.ft_batch, p.train_size,
                p.val_size, seed]
        key = hashlib.sha256(json.dumps(what).encode()).hexdigest()
        folder = self.cache / "adapters" / f"{'mpnet' if backbone != WEAK else WEAK}-{p.ft_method}-{key[:12]}"
        if (folder / "adapter_config.json").is_file():
            return load_adapter(folder, memo).eval(), read_config(folder)["fit"]
        misses, hits = memo.misses, memo.hits
        config = TrainConfig(lr=get_method(p.ft_method).lr, max_steps=p.ft_steps, batch_size=p.ft_batch, seed=seed)
        opened = Opened(memo, make_task(self.splits, handle, None), self.splits.val, None)  # test: scored apart
        run, model = run_once(opened, p.ft_method, config, progress=self.progress)
        info = {"lr": run["lr"], "steps": run["steps"], "best_step": run["best_step"], "best_val": run["best_val"],
                "train_s": round(run["train_seconds"], 1), "backbone_rows": memo.misses - misses,
                "remembered_rows": memo.hits - hits}
        save_adapter(model, folder, extra={"fit": info, "seed": seed, "data": self.data})
        return model.eval(), info

    def run_seed(self, seed: int) -> None:
        from graytune.transfer.eft import eft_scores

        put, has, test = self.store.put, self.store.has, self.q.test
        if has(seed, *ROWS):
            log.info("seed %d: every row is in %s already", seed, self.store.path)
            return
        for key, encoder in (("weak_zs", self.weak), ("strong_zs", self.strong)):
            if not has(seed, key):
                start = time.perf_counter()
                put(seed, key, {**metrics(self.scores(encoder, test), self.test_labels, self.splits),
                                "seconds": round(time.perf_counter() - start, 1)})
        weak_ft, info = self.fine_tuned(WEAK, seed)
        weak_ft_test = self.scores(weak_ft, test)
        teacher = {**metrics(weak_ft_test, self.test_labels, self.splits), **info}
        if not has(seed, "weak_ft"):
            put(seed, "weak_ft", teacher)
        self.check_reused_teacher(seed, teacher)
        if not has(seed, "strong_ft"):
            strong_ft, info = self.fine_tuned(self.strong_id, seed)
            put(seed, "strong_ft", {**metrics(self.scores(strong_ft, test), self.test_labels, self.splits), **info})
            del strong_ft
        if not has(seed, "eft"):
            start = time.perf_counter()
            eft = eft_scores(self.scores(self.strong, test), weak_ft_test, self.scores(self.weak, test))
            put(seed, "eft", {**metrics(eft, self.test_labels, self.splits),
                              "seconds": round(time.perf_counter() - start, 1)})
        main = ("tm", "tm_plus", "no_basis_change", "beta_per_sample", "beta_fixed_small", "beta_per_sample_small")
        for keys, pool, m, noise in ((main, self.q.unlabeled, self.p.classes, self.p.noise_per),
                                     (("tm_all_pool",), self.pool_all, self.p.classes, self.p.noise_per),
                                     (("no_aux",), self.q.unlabeled, len(self.names), self.p.noise_per),
                                     (("noise_per_sample",), self.q.unlabeled, self.p.classes, "sample")):
            if not has(seed, *keys):
                self.transmiter(seed, keys, pool, m, noise, weak_ft)
        self.weak.save()
        self.strong.save()

    def check_reused_teacher(self, seed: int, teacher: dict[str, Any]) -> None:
        """A reused ``weak_ft`` row must be the teacher trained again here: the largest metric gap is recorded."""
        reused = self.store.data.get("reused", {}).get("rows", {}).get(str(seed), [])
        if "weak_ft" not in reused:
            return
        row = self.store.data["seeds"][str(seed)]["weak_ft"]
        gap = max(abs(row[k] - teacher[k]) for k in ("base_accuracy", "novel_accuracy", "harmonic_mean"))
        if gap > 1e-6:
            log.warning("seed %d: the teacher trained again differs from the reused weak_ft row by %.4f", seed, gap)
        self.store.update(lambda data: data["reused"].setdefault("teacher_gap", {}).update({str(seed): gap}))

    def transmiter(self, seed: int, keys: Sequence[str], pool: Sequence[str], m: int, noise: str, weak_ft: Any
                   ) -> None:
        """Extract from ``weak_ft`` on ``pool``, transfer to MPNet, and write the rows ``keys`` asks for."""
        from graytune.transfer.transmiter import ExtractConfig, PlusConfig, TransMiter, procrustes_beta

        p, labels = self.p, self.test_labels
        tm = TransMiter.create(self.names, total=m, seed=seed, prompt=self.prompt, aux_draw=p.aux_draw)
        teacher = self.scores(weak_ft, pool)  # [N, task classes]
        weak_u, strong_u = tm.scores(self.weak, pool), tm.scores(self.strong, pool)
        strong_test = tm.scores(self.strong, self.q.test)  # [test, M]
        start = time.perf_counter()
        history = tm.extract(weak_u, teacher, ExtractConfig(epochs=p.extract_epochs, noise_per=noise, seed=seed),
                             progress=self.progress)
        extract_s = time.perf_counter() - start

        def transferred(n: int, per_sample: float | None) -> tuple[TransMiter, dict[str, Any]]:
            start = time.perf_counter()
            moved = tm.transfer(weak_u[:n], strong_u[:n], beta=p.beta, beta_per_sample=per_sample)
            return moved, {"n": n, "beta": procrustes_beta(n, p.beta, per_sample),
                           "transfer_s": round(time.perf_counter() - start, 2)}

        def row(adapted: Callable[[], torch.Tensor], **extra: Any) -> dict[str, Any]:
            with torch.no_grad():
                return {**metrics(adapted(), labels, self.splits), **extra}

        n, small = len(pool), max(2, round(p.small_pool * len(pool)))
        moved, info = transferred(n, None)
        common = {"extract_s": round(extract_s, 2), "extract_loss": history, "classes": m, "noise_per": noise}
        out = {keys[0]: row(lambda: moved.adapt(strong_test), **info, **common)}
        if "no_basis_change" in keys:
            out["no_basis_change"] = row(lambda: tm.adapt(strong_test), n=n)
            for key, size, per_sample in (("beta_per_sample", n, p.beta_per_sample),
                                          ("beta_fixed_small", small, None),
                                          ("beta_per_sample_small", small, p.beta_per_sample)):
                other, info = transferred(size, per_sample)
                out[key] = row(lambda: other.adapt(strong_test), **info)
        if "tm_plus" in keys:
            plus = copy.deepcopy(moved)
            start = time.perf_counter()
            best = plus.finetune(plus.scores(self.strong, self.q.train), self.q.train_labels,
                                 plus.scores(self.strong, self.q.val), self.q.val_labels,
                                 PlusConfig(max_steps=p.plus_steps, seed=seed), progress=self.progress)
            out["tm_plus"] = row(lambda: plus.adapt(strong_test), **best, shots=p.shots,
                                 plus_s=round(time.perf_counter() - start, 1))
        for key in keys:
            self.store.put(seed, key, out[key])


def reuse(store: Store, old: Path, seeds: Sequence[int]) -> None:
    """Copy the ``DRAW_FREE`` rows of ``seeds`` from ``old`` (same protocol but the draw; none: ``concrete``)."""
    then, now = json.loads(old.read_text()), store.data
    differ = [k for k in set(then["protocol"]) | set(now["protocol"])
              if k != "aux_draw" and then["protocol"].get(k) != now["protocol"].get(k)]
    differ += [k for k in ("weak", "strong", "data", "strong_sha256") if then.get(k) != now.get(k)]
    if differ:
        raise SystemExit(f"--reuse {old}: its {', '.join(sorted(differ))} differ from this run's; use another file")
    copied: dict[str, list[str]] = {}
    for seed in map(str, seeds):
        rows = {k: v for k, v in then["seeds"].get(seed, {}).items()
                if k in DRAW_FREE and k not in now["seeds"].get(seed, {})}
        if rows:
            copied[seed] = sorted(rows)
            store.update(lambda data, seed=seed, rows=rows: data["seeds"].setdefault(seed, {}).update(rows))
    draw = then["protocol"].get("aux_draw", "concrete")
    store.update(lambda data: data.setdefault("reused", {"from": str(old), "aux_draw": draw, "rows": {}})["rows"]
                 .update(copied))
    log.info("reused from %s (drawn %s): %s", old, draw, copied or "nothing new")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Protocol()
    parser.add_argument("--data", default="wordnet-supersense", help=f"one of {', '.join(RAW)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", help="the raw JSON (default: docs/transmiter-text-raw.json for WordNet, "
                        "docs/transmiter-text-fortunes-raw.json for fortunes)")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"embeddings and adapters (default: {CACHE})")
    parser.add_argument("--mpnet", type=Path, default=install_mpnet.DEFAULT_TARGET, help="the MPNet folder")
    parser.add_argument("--ft-method", default=defaults.ft_method, help="weak and strong fine-tuning (default: output)")
    parser.add_argument("--ft-steps", type=int, default=defaults.ft_steps, help="optimizer steps of batch 32, each")
    parser.add_argument("--classes", type=int, default=defaults.classes, help="M: task plus auxiliary classes")
    parser.add_argument("--beta-per-sample", type=float, default=defaults.beta_per_sample)
    parser.add_argument("--plus-steps", type=int, default=defaults.plus_steps, help="TransMiter+ optimizer steps")
    parser.add_argument("--shots", type=int, default=defaults.shots, help="TransMiter+ labels per base class")
    parser.add_argument("--aux-draw", default=defaults.aux_draw, choices=("balanced", "concrete"))
    parser.add_argument("--reuse", type=Path, metavar="OLD_RAW", help="copy DRAW_FREE rows from a raw file")
    parser.add_argument("--smoke", action="store_true", help="a tiny subset, seed 0, a few steps, into a temp folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.data not in RAW:
        parser.error(f"--data {args.data!r} is not a text set this study knows; choose one of {', '.join(RAW)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    mpnet = install_mpnet.install(args.mpnet, say=log.info)  # idempotent; checks model.safetensors' SHA-256
    protocol = replace(defaults, ft_method=args.ft_method, ft_steps=args.ft_steps, classes=args.classes,
                       beta_per_sample=args.beta_per_sample, plus_steps=args.plus_steps, shots=args.shots,
                       aux_draw=args.aux_draw)
    seeds = [int(s) for s in args.seeds.split(",")]
    out, cache = Path(args.out or RAW[args.data]), args.cache
    if args.smoke:  # a fresh folder outside the repository, kept for a look (never docs/)
        tmp = Path(tempfile.mkdtemp(prefix="transmiter-text-smoke-"))
        protocol, seeds, out, cache = SMOKE, seeds[:1], tmp / "raw.json", tmp / "cache"
    head = {"protocol": asdict(protocol), "weak": WEAK, "strong": f"hf-text:{mpnet}",
            "data": f"{args.data}:base-to-novel", "strong_sha256": install_mpnet.SHA256,
            "torch_threads": torch.get_num_threads()}
    store = Store(out, head)
    if args.reuse:
        reuse(store, args.reuse, seeds)
    experiment = Experiment(protocol, f"hf-text:{mpnet}", cache, store, progress=not args.quiet, data=args.data)
    for seed in seeds:
        seed_start = time.perf_counter()
        experiment.run_seed(seed)
        log.info("seed %d done in %.0f s", seed, time.perf_counter() - seed_start)
    log.info("embedding time: MiniLM %.0f s, MPNet %.0f s", experiment.weak.seconds, experiment.strong.seconds)
    if args.smoke:
        import transmiter_text_table

        transmiter_text_table.main(["--raw", str(out), "--figures", str(out.parent)])
        log.info("smoke done in %.0f s; raw JSON and figure in %s", time.perf_counter() - started, out.parent)


if __name__ == "__main__":
    main()
