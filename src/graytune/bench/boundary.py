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
    return {"boundary_s": b_med, "plain_s": p_med, "ratio": b_med / p_med,
            "boundary_all_s": b_times, "plain_all_s": p_times}


def peak_memory(case: str, steps: int = 2) -> dict[str, Any]:
    """Peak-RSS growth of adapter steps vs full fine-tuning steps, each in a fresh process."""
    out: dict[str, Any] = {}
    for mode in ("boundary", "full"):
        proc = subprocess.run([sys.executable, "-m", "graytune.bench.memory", case, mode, str(steps)],
                              capture_output=True, text=True, check=True, env=dict(os.environ))
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        out[mode] = {**row, "growth_mb": row["peak_mb"] - row["before_mb"]}
    out["growth_ratio"] = out["boundary"]["growth_mb"] / max(out["full"]["growth_mb"], 1e-9)
    out["peak_ratio"] = out["boundary"]["peak_mb"] / out["full"]["peak_mb"]
    return out


def run_benchmarks(cases: list[str], rounds: int = 8) -> dict[str, Any]:
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
             f"{'case':<20}{'boundary s':>12}{'plain s':>10}{'ratio':>8}   "
             f"{'adapter +MB':>12}{'full FT +MB':>12}{'ratio':>8}"]
    for case, r in results["cases"].items():
        t, mem = r["time"], r["memory"]
        lines.append(f"{case:<20}{t['boundary_s']:>12.3f}{t['plain_s']:>10.3f}{t['ratio']:>8.3f}   "
                     f"{mem['boundary']['growth_mb']:>12.0f}{mem['full']['growth_mb']:>12.0f}"
                     f"{mem['growth_ratio']:>8.3f}")
    lines += ["", "step time: median of interleaved rounds (boundary = dark-gray handle; plain = autograd through",
              "the same frozen module); memory: growth of peak RSS during 2 AdamW steps over the loaded state,",
              "adapter through the boundary vs full fine-tuning, each in a fresh process"]
    return "\n".join(lines)
