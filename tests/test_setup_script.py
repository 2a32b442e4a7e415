"""scripts/setup.sh leaves no broken command in .venv/bin: CLIP_benchmark is installed without its dependencies
(open_clip needs torchvision, which breaks here) for its metrics only, and its console scripts, which import
torchvision, are removed."""

from __future__ import annotations

from importlib.metadata import distribution
from pathlib import Path

SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"


def test_clip_benchmarks_console_scripts_are_removed_after_its_install() -> None:
    text = SETUP.read_text()
    install = text.index('--no-deps "clip_benchmark==')
    scripts = [e.name for e in distribution("clip_benchmark").entry_points if e.group == "console_scripts"]
    assert scripts  # clip_benchmark and clip_benchmark_export_wds in 1.6.2
    for name in scripts:
        removal = f".venv/bin/{name}"
        assert any(removal in line.split() and line.lstrip().startswith("rm ")
                   for line in text[install:].splitlines()), f"setup.sh leaves the broken {name} command"
