"""Language models behind the boundary, measured side by side (``graytune bench``; ``--no-lm`` skips it).

- **Boundary overhead**: one training step of DGA on a causal LM (a shift on every real token embedding
  and one token inserted before the first; forward and backward of the completion NLL, then AdamW on
  the adapter's tensors) through a dark-gray handle, against the same computation by plain autograd
  through the white-box module with the edits applied by hand as ``inputs_embeds``
  (``lm_steps.plain_loss``). Both in one process, interleaved round by round (who goes first
  alternates), after untimed warm-up steps; the ratio of medians is reported, target <= 1.03.
- **Memory per method**: the peak tensor memory of one training step of every LM method (and of
  ``native``: DGA by plain autograd), each in a fresh process, from the torch profiler's allocation
  events (``eval.profiling.peak_tensor_mb``); ``total_mb`` = one copy of the backbone's weights (resident
  for every method; the copy full fine-tuning trains) + the step's peak (activations; gradients and
  AdamW's two moments of whatever trains). Ratios are to full fine-tuning's total. Before its step,
  full fine-tuning checks that the machine has room for a gradient and two moments per weight, and
  reports that it does not fit instead of taking the machine's memory from others.

The batch is random token ids laid out as completions (``lm_steps.lm_batch``): memory and time do not
depend on which tokens they are, so the random-weight ``arch:llama-1b`` gives a 1B model's figures.

Example:
    >>> results = run(overhead=Scale("arch:llama-tiny", 2, 12), scales=[Scale("arch:llama-tiny", 2, 12)],
    ...               methods=["dga", "full"], rounds=2, isolate=False, progress=False)
    >>> print(format_report(results))
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from graytune.bench.clip_measure import machine
from graytune.bench.lm_steps import LM_METHODS, NATIVE, ZO_ESTIMATOR, method_step, overhead_steps
from graytune.errors import UnknownNameError
from graytune.eval.profiling import peak_tensor_mb

log = logging.getLogger(__name__)

OVERHEAD_TARGET = 1.03
"""Boundary step time / plain autograd step time, at most."""
LABELS = {"smollm2-135m": "SmolLM2-135M-Instruct, Q4-quantised GGUF de-quantised to fp32",
          "qwen2.5-0.5b": "Qwen2.5-Coder-0.5B-Instruct, Q4-quantised GGUF de-quantised to fp32",
          "arch:llama-1b": "Llama-3.2-1B's shape, random weights", "arch:llama-tiny": "tiny Llama, random weights"}
"""How the report names a backbone."""


@dataclass(frozen=True)
class Scale:
    """A backbone and the batch measured on it: ``batch`` rows of up to ``length`` tokens."""

    backbone: str
    batch: int
    length: int


OVERHEAD = Scale("smollm2-135m", 8, 30)
SCALES = (Scale("smollm2-135m", 8, 30), Scale("arch:llama-1b", 2, 16))


def overhead(backbone: str, batch: int, length: int, rounds: int, warmup: int = 1) -> dict[str, Any]:
    """Median step seconds of DGA through the boundary and by plain autograd, interleaved (one process)."""
    torch.manual_seed(0)
    boundary, plain, tokens = overhead_steps(backbone, batch, length)
    for _ in range(warmup):
        boundary()
        plain()
    times: dict[str, list[float]] = {"boundary": [], "plain": []}
    for r in range(rounds):
        for name in (("boundary", "plain") if r % 2 == 0 else ("plain", "boundary")):
            times[name].append(_timed(boundary if name == "boundary" else plain))
        log.info("LM overhead round %d: boundary %.3fs plain %.3fs", r, times["boundary"][-1], times["plain"][-1])
    b, p = statistics.median(times["boundary"]), statistics.median(times["plain"])
    per_round = sorted(x / y for x, y in zip(times["boundary"], times["plain"]))
    quartiles = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    fastest = min(times["boundary"]) / min(times["plain"])  # the rounds least disturbed by other load
    return {"boundary_s": b, "plain_s": p, "ratio": b / p, "round_ratio_quartiles": quartiles, "rounds": rounds,
            "min_ratio": fastest,
            "warmup": warmup, "tokens": int(tokens["text.attention_mask"].sum()),
            "targets": int((tokens["text.target_ids"] >= 0).sum()),
            "boundary_all_s": times["boundary"], "plain_all_s": times["plain"]}


def memory_cell(backbone: str, method: str, batch: int, length: int) -> dict[str, Any]:
    """Peak tensor memory of ``method``'s first training step (run it in a fresh process)."""
    torch.manual_seed(0)
    step, info = method_step(backbone, method, batch, length)
    if method == "full":
        short = _no_room(3 * info["weights_mb"], info["params"])
        if short:
            return {**info, "error": short}
    start = time.perf_counter()
    return {**info, "step_peak_mb": peak_tensor_mb(step), "profiled_step_s": time.perf_counter() - start}


def _no_room(needed_mb: float, params: int) -> str:
    """Why a step adding ``needed_mb`` of gradients and moments cannot run here ("" when it can, or unknown)."""
    available = _available_mb()
    margin = 1.2 * needed_mb + 512  # activations, a tied embedding's two gradients, AdamW's temporaries
    if available is None or available >= margin:
        return ""
    return (f"does not fit: full fine-tuning with AdamW adds a gradient and two moments per weight, about "
            f"{needed_mb / 1024:.1f} GiB for {params / 1e9:.2f} B weights, and this machine has "
            f"{available / 1024:.1f} GiB available")


def _available_mb() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


MEASUREMENTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "overhead": lambda p: overhead(**p),
    "cell": lambda p: memory_cell(**p),
}
"""What ``python -m graytune.bench.lm KIND PAYLOAD`` measures, by KIND."""


def measure(kind: str, payload: dict[str, Any], isolate: bool) -> dict[str, Any]:
    """One measurement, in a fresh process unless ``isolate`` is off; ``{"error": ...}`` when it failed."""
    if not isolate:
        try:
            return MEASUREMENTS[kind](payload)
        except Exception as err:  # noqa: BLE001  (reported in its row, as from a fresh process)
            log.warning("%s %s failed", kind, payload, exc_info=True)
            return {"error": f"{type(err).__name__}: {err}"}
    proc = subprocess.run([sys.executable, "-m", "graytune.bench.lm", kind, json.dumps(payload)],
                          capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        log.warning("%s %s failed:\n%s", kind, payload, proc.stderr[-4000:])
        killed = f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0 else ""
        return {"error": killed or (lines[-1] if lines else f"exit status {proc.returncode}")}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(overhead: Scale | None = OVERHEAD, scales: Sequence[Scale] = SCALES, methods: Sequence[str] = LM_METHODS,
        rounds: int = 12, warmup: int = 1, isolate: bool = True, progress: bool = True) -> dict[str, Any]:
    """The LM boundary overhead and the memory table per scale; plain data for JSON.

    Args:
        overhead: where to time DGA through the boundary against plain autograd (``None``: not timed).
        scales: where to measure each method's memory; ``full`` and ``native`` always run (the references).
        methods: LM methods (``lm_steps.LM_METHODS``).
        rounds, warmup: interleaved timed rounds and untimed steps before them.
        isolate: each measurement in a fresh process (off: in this one, for tests).
        progress: a progress bar on stderr.
    """
    from tqdm.auto import tqdm

    for name in methods:  # before any long work
        if name not in (*LM_METHODS, NATIVE):
            raise UnknownNameError("language-model method", name, [*LM_METHODS, NATIVE])
    wanted = list(dict.fromkeys([*methods, "full", NATIVE]))
    results: dict[str, Any] = {"machine": machine(torch.device("cpu")), "overhead": None, "memory": []}
    if overhead is not None:
        row = measure("overhead", {**asdict(overhead), "rounds": rounds, "warmup": warmup}, isolate)
        results["overhead"] = {**asdict(overhead), "method": "dga", **row}
    cells = [(scale, method) for scale in scales for method in wanted]
    rows: dict[Scale, dict[str, Any]] = {scale: {} for scale in scales}
    for scale, method in tqdm(cells, desc="LM memory cells", unit="cell", disable=not progress):
        rows[scale][method] = measure("cell", {**asdict(scale), "method": method}, isolate)
        log.info("%s %s: %s", scale, method, rows[scale][method])
    results["memory"] = [_table(scale, rows[scale]) for scale in scales]
    results["machine"]["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["settings"] = {"methods": wanted, "rounds": rounds, "warmup": warmup, "isolated": isolate,
                           "zeroth_order": f"{ZO_ESTIMATOR} (2 forwards per step)",
                           "options": "registry defaults", "optimizer": "AdamW at each method's registry rate"}
    return results


def _table(scale: Scale, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``rows`` with totals and ratios to full fine-tuning and to the native step."""
    sized = [rows[m] for m in (NATIVE, "full") if "weights_mb" in rows.get(m, {})]
    weights = sized[0]["weights_mb"] if sized else None
    for row in rows.values():
        if weights is not None and "step_peak_mb" in row:
            row["total_mb"] = weights + row["step_peak_mb"]
    refs = {m: rows.get(m, {}).get("total_mb") for m in ("full", NATIVE)}
    # full fine-tuning did not run: its floor is weights, gradients and two AdamW moments, no activations
    floor = 4 * weights if weights is not None and not refs["full"] else None
    for row in rows.values():
        for ref, total in {**refs, "full_floor": floor}.items():
            if "total_mb" in row and total:
                row[f"vs_{ref}"] = row["total_mb"] / total
    return {**asdict(scale), "label": LABELS.get(scale.backbone, scale.backbone), "weights_mb": weights,
            "params": sized[0]["params"] if sized else None, "full_floor_mb": floor, "rows": rows}


def format_report(results: dict[str, Any]) -> str:
    m = results["machine"]
    load = m.get("load_avg") or ["?"]
    end = m.get("load_avg_end") or ["?"]
    lines = [f"language models: CPU {m['cpu']}, {m['cores']} cores, {m['threads']} threads; torch {m['torch']}; "
             f"measured {m['date']}; 1-min load average {_num(load[0], 1)} at the start, {_num(end[0], 1)} at the end"]
    o = results.get("overhead")
    if o is not None:
        lines += ["", *_overhead_lines(o)]
    for table in results["memory"]:
        lines += ["", *_table_lines(table)]
    lines += ["", "overhead: one DGA step (shift + 1 inserted token; forward + backward of the completion NLL, AdamW)",
              "through a dark-gray handle vs the same computation by plain autograd through the white-box module,",
              "interleaved; round IQR = quartiles of per-round ratios. memory: the first step's peak tensor memory",
              "(activations; gradients and AdamW state of what trains), torch profiler, "
              f"{'each row in a fresh process' if results['settings']['isolated'] else 'all rows in one process'};",
              "total = one copy of the weights + step peak. zero-shot: a forward under no_grad; prompt-zo: MeZO's",
              "two forwards + AdamW; native: DGA by plain autograd. Methods with their registry defaults."]
    return "\n".join(lines)


def _overhead_lines(o: dict[str, Any]) -> list[str]:
    head = (f"LM boundary overhead: {o['backbone']} ({LABELS.get(o['backbone'], o['backbone'])}), dga, "
            f"batch {o['batch']} x {o['length']} tokens")
    if "error" in o:
        return [head, f"  failed: {o['error']}"]
    q = o["round_ratio_quartiles"]
    noisy = q[2] - q[0] > 2 * (OVERHEAD_TARGET - 1)  # rounds disagree by more than the target's margin
    verdict = "noisy" if noisy else "PASS" if o["ratio"] <= OVERHEAD_TARGET else "FAIL"
    lines = [head, f"  boundary {o['boundary_s']:.3f} s, plain autograd {o['plain_s']:.3f} s, ratio {o['ratio']:.3f} "
                   f"(round IQR {q[0]:.2f}-{q[2]:.2f}; medians of {o['rounds']} interleaved rounds; fastest rounds' "
                   f"ratio {o['min_ratio']:.3f}) [{verdict}] target <= {OVERHEAD_TARGET}"]
    if noisy:
        lines.append("  the per-round ratios spread wider than the target's margin, so the target is neither met nor "
                     "missed here (other load on the machine); rerun on a quiet one")
    return lines


def _table_lines(t: dict[str, Any]) -> list[str]:
    size = (f"{t['params'] / 1e6:.1f} M params, weights {t['weights_mb']:.0f} MB" if t["weights_mb"] else
            "weights not measured")
    lines = [f"memory per method: {t['backbone']} ({t['label']}), {size}; batch {t['batch']} x {t['length']} tokens",
             f"{'method':<11}{'trainable':>14}{'step peak MB':>14}{'total MB':>10}{'/full':>8}{'/native':>9}"]
    floor = t.get("full_floor_mb")
    for method, row in t["rows"].items():
        if "error" in row:
            lines.append(f"{method:<11}{row.get('trainable', 0):>14,}  {row['error']}")
            continue
        vs_full = f"<={_num(row['vs_full_floor'], 3)}" if "vs_full_floor" in row else _num(row.get("vs_full"), 3)
        lines.append(f"{method:<11}{row['trainable']:>14,}{row['step_peak_mb']:>14.0f}"
                     f"{_num(row.get('total_mb'), 0):>10}{vs_full:>8}{_num(row.get('vs_native'), 3):>9}")
    if floor:
        lines.append(f"full fine-tuning did not run: /full is to its floor, {floor:.0f} MB = 4 x the weights (weights, "
                     "gradients, two AdamW moments; no activations), so each true ratio is lower")
    return lines


def _num(value: Any, digits: int) -> str:
    """``value`` to ``digits`` places, or ``-`` where there is no number."""
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def _main(argv: Sequence[str]) -> None:
    kind, payload = argv[0], json.loads(argv[1])
    if kind not in MEASUREMENTS:
        raise SystemExit(f"unknown measurement {kind!r}; use one of {', '.join(MEASUREMENTS)}")
    print(json.dumps(MEASUREMENTS[kind](payload)))


if __name__ == "__main__":
    _main(sys.argv[1:])
