"""``make gpu-check``'s script refuses what it cannot measure, saying what to do (its GPU run is not possible
here; ``--device cpu --quick`` checks the command itself, in about 3 minutes, and is not part of the suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: make gpu-check runs for real")
def test_without_a_gpu_it_says_how_to_run_it() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stderr and "--device cpu --quick" in done.stderr


def test_a_cpu_run_must_say_it_is_only_a_check() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "add --quick" in done.stderr
