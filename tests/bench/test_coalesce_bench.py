"""The coalescing bench's report (the measured grid is `make bench`'s; the run itself is not timed here)."""

from __future__ import annotations

from graytune.bench.coalesce import format_report
from graytune.cli.main import build_parser


def _cell(clients: int, batch: int, ratio: float) -> dict[str, float]:
    return {"clients": clients, "batch": batch, "samples_per_s_off": 10.0, "samples_per_s_on": 10.0 * ratio,
            "ratio": ratio, "p50_step_s_off": 0.2, "p50_step_s_on": 0.1, "solo_step_s": 0.05, "p50_over_solo_on": 2.0}


def test_the_report_prints_each_cell_and_the_crossover_per_client_count() -> None:
    report = {"window_ms": 10.0, "steps": 3, "rounds": 2,
              "cells": [_cell(4, 1, 1.6), _cell(4, 64, 0.97), _cell(16, 1, 2.3), _cell(16, 64, 1.02)]}
    text = format_report(report)
    assert "| 16 | 1 | 10.0 | 23.0 | 2.30x |" in text
    assert "crossover at 4 clients: coalescing stops paying from batch 64" in text
    assert "crossover at 16 clients: none in this grid" in text


def test_graytune_bench_measures_coalescing_unless_told_not_to() -> None:
    assert build_parser().parse_args(["bench"]).coalesce is True
    assert build_parser().parse_args(["bench", "--no-coalesce"]).coalesce is False
