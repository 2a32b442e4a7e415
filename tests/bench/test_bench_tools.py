"""The benchmark's measuring tools measure what they claim (no timing assertions here)."""

from __future__ import annotations

import pytest
import torch

from graytune.bench.boundary import format_report
from graytune.eval.profiling import peak_tensor_mb as step_peak_mb


def test_step_peak_counts_a_known_allocation() -> None:
    def step() -> None:
        a = torch.ones(10 * 2**20 // 4)  # 10 MiB of float32
        b = a * 2  # another 10 MiB while a is alive
        del a, b

    assert step_peak_mb(step) == pytest.approx(20.0, abs=0.5)


def test_report_formats_every_case() -> None:
    mem = {m: {"total_mb": 100.0} for m in ("boundary", "plain", "full")}
    result = {"machine": {"torch": "x", "threads": 2, "cores": 2, "python": "3.11"},
              "cases": {"minilm": {"time": {"boundary_s": 0.5, "plain_s": 0.49, "ratio": 1.02,
                                            "round_ratio_quartiles": [0.99, 1.0, 1.04]},
                                   "memory": {**mem, "ratio_vs_full": 1.0}}}}
    text = format_report(result)
    assert "minilm" in text and "1.020" in text and "0.99-1.04" in text
