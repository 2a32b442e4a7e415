"""Peak resident memory of a few steps, measured in a fresh process per mode.

``python -m graytune.bench.memory CASE MODE STEPS`` prints one JSON line:
the process's peak RSS before the steps (models and inputs loaded) and after.
"""

from __future__ import annotations

import json
import resource
import sys

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def measure(case: str, mode: str, steps: int) -> dict[str, float]:
    from graytune.bench.cases import CASES

    torch.manual_seed(0)
    step = getattr(CASES[case], mode)()
    before = peak_rss_mb()
    for _ in range(steps):
        step()
    return {"before_mb": before, "peak_mb": peak_rss_mb()}


if __name__ == "__main__":
    name, which, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps(measure(name, which, count)))
