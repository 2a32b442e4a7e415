"""peak_tensor_mb measures tensors and keeps kineto's USDT start/stop lines off the user's terminal."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from graytune.eval.profiling import _without_kineto_markers, peak_tensor_mb

SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from graytune.eval.profiling import peak_tensor_mb

    def work():
        print("python stderr from the work", file=sys.stderr, flush=True)
        os.write(2, b"fd 2 from the work\\n")
        return torch.ones(1024, 1024) * 2  # 4 MB

    print(f"{peak_tensor_mb(work):.1f}")
    try:
        peak_tensor_mb(lambda: 1 / 0)
    except ZeroDivisionError:
        print("raised", file=sys.stderr)
    print("fd 2 is back", file=sys.stderr)
""")


def test_no_usdt_lines_reach_stderr_and_the_work_still_speaks() -> None:
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}  # the default a user has
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "USDT" not in done.stderr and "profiler_start" not in done.stderr and "profiler_stop" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines == ["python stderr from the work", "fd 2 from the work", "raised", "fd 2 is back"]
    assert float(done.stdout) >= 4.0


def test_other_lines_written_while_the_profiler_starts_are_passed_on(capfd) -> None:
    before = os.fstat(2)
    with _without_kineto_markers():
        os.write(2, b"USDT:2026-01-01 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"WARNING: something a user should see\n")
    assert capfd.readouterr().err == "WARNING: something a user should see\n"
    with pytest.raises(RuntimeError), _without_kineto_markers():
        raise RuntimeError("inside")
    assert os.fstat(2).st_ino == before.st_ino  # fd 2 restored after an error


def test_peak_counts_the_tensors_made_inside() -> None:
    assert 7.9 < peak_tensor_mb(lambda: torch.zeros(2 * 2**20)) < 8.5  # 2 Mi floats = 8 MB
