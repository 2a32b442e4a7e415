"""Boundary overhead and adapter memory, measured side by side in one run.

Step time: the same adapter step through the dark-gray boundary and by plain
autograd through the same frozen module, interleaved round by round so that
machine noise hits both alike; the ratio of medians is reported.
Memory: each mode runs in its own fresh process; the figure is the growth of
peak RSS over the steps (models and inputs already loaded), for the adapter
step and for full fine-tuning (AdamW on every weight) of the same backbone.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from graytune.bench.cases import CASES

log = logging.getLogger(__name__)


def _time(step: Any) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def step_times(case: str, rounds: int, warmup: int = 2) -> dict[str, Any]:
    """Median step seconds through the boundary and by plain autograd, interleaved."""
    boundary, plain = CASES[case].boundary(), CASES[case].plain()
    for _ in range(warmup):
        boundary()
        plain()
    b_times, p_times = [], []
    for r in range(rounds):
        first, second = (boundary, plain) if r % 2 == 0 else (plain, boundary)  # alternate who goes first
        t1, t2 = _time(first), _time(second)
        b, p = (t1, t2) if r % 2 == 0 else (t2, t1)
        b_times.append(b)
        p_times.append(p)
        log.info("%s round %d: boundary %.3fs plain %.3fs", case, r, b, p)
    b_med, p_med = statistics.median(b_times), statistics.median(p_times)
    per_round = sorted(b / p for b, p in zip(b_times, p_times))
    quartiles = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    return {"boundary_s": b_med, "plain_s": p_med, "ratio": b_med / p_med,
            "round_ratio_quartiles": [quartiles[0], quartiles[1], quartiles[2]],
            "boundary_all_s": b_times, "plain_all_s": p_times}


def peak_memory(case: str) -> dict[str, Any]:
    """Peak memory of one AdamW step: boundary adapter, plain adapter, full fine-tuning.

    Each mode runs in a fresh process; ``total_mb`` is the backbone's weights
    plus the step's peak tensor memory (activations, gradients, optimizer state).
    """
    out: dict[str, Any] = {}
    for mode in ("boundary", "plain", "full"):
        proc = subprocess.run([sys.executable, "-m", "graytune.bench.memory", case, mode],
                              capture_output=True, text=True, check=True, env=dict(os.environ))
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        out[mode] = {**row, "total_mb": row["weights_mb"] + row["step_peak_mb"]}
    out["ratio_vs_full"] = out["boundary"]["total_mb"] / out["full"]["total_mb"]
    out["ratio_vs_plain"] = out["boundary"]["total_mb"] / out["plain"]["total_mb"]
    return out


def run_benchmarks(cases: list[str], rounds: int = 12) -> dict[str, Any]:
    """Every measurement for ``cases``; plain data, ready for JSON."""
    from graytune.errors import UnknownNameError

    for case in cases:
        if case not in CASES:
            raise UnknownNameError("benchmark case", case, CASES)
    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count()},
        "cases": {},
    }
    for case in cases:
        results["cases"][case] = {"workload": CASES[case].shape, "time": step_times(case, rounds),
                                  "memory": peak_memory(case)}
    return results


def format_report(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"torch {m['torch']}, {m['threads']} threads, {m['cores']} cores, python {m['python']}", "",
             f"{'case':<20}{'boundary s':>11}{'plain s':>9}{'ratio':>7}{'round IQR':>13}  "
             f"{'boundary MB':>12}{'plain MB':>9}{'full FT MB':>11}{'vs full':>8}"]
    for case, r in results["cases"].items():
        t, mem = r["time"], r["memory"]
        q = t["round_ratio_quartiles"]
        lines.append(f"{case:<20}{t['boundary_s']:>11.3f}{t['plain_s']:>9.3f}{t['ratio']:>7.3f}"
                     f"{f'{q[0]:.2f}-{q[2]:.2f}':>13}  "
                     f"{mem['boundary']['total_mb']:>12.0f}{mem['plain']['total_mb']:>9.0f}"
                     f"{mem['full']['total_mb']:>11.0f}{mem['ratio_vs_full']:>8.3f}")
    lines += ["", "Step time: medians of interleaved rounds; boundary = the adapter through a dark-gray handle, plain =",
              "the same adapter by autograd through the same frozen module; round IQR = quartiles of per-round ratios.",
              "Memory: backbone weights + peak tensor memory of one AdamW step (activations, gradients, optimizer",
              "state), from the torch profiler, each mode in a fresh process; full FT = AdamW on every weight."]
    return "\n".join(lines)
