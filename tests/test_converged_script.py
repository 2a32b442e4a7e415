"""scripts/converged.py's own logic (the rate grid and pick, plateau detection in scripts/study_kit.py; the
resumable study loop) and scripts/converged_table.py's rendering, on made-up runs: no backbone, seconds."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.scripts import load_script

kit = load_script("study_kit")
converged = load_script("converged")
converged_table = load_script("converged_table")


@pytest.mark.parametrize("registry, grid", [
    (1e-3, [3e-4, 1e-3, 3e-3]), (3e-3, [1e-3, 3e-3, 1e-2]), (3e-5, [1e-5, 3e-5, 1e-4]), (2.5e-3, [1e-3, 3e-3, 1e-2]),
])
def test_lr_grid_is_the_ladder_around_the_registry_rate(registry: float, grid: list[float]) -> None:
    assert kit.lr_grid(registry) == pytest.approx(grid)


def test_pick_lr_takes_the_best_validation_and_names_an_edge() -> None:
    assert kit.pick_lr({3e-4: .6, 1e-3: .7, 3e-3: .65}, 1e-3) == (1e-3, "")
    assert kit.pick_lr({3e-4: .6, 1e-3: .7, 3e-3: .75}, 1e-3) == (3e-3, "high")
    assert kit.pick_lr({3e-4: .8, 1e-3: .7, 3e-3: .75}, 1e-3) == (3e-4, "low")
    assert kit.pick_lr({3e-4: .7, 1e-3: .7, 3e-3: .7}, 1e-3) == (1e-3, "")  # a tie: the registry's
    assert kit.next_rate({3e-4: .6, 1e-3: .7, 3e-3: .75}, "high") == pytest.approx(1e-2)
    assert kit.next_rate({3e-4: .8, 1e-3: .7, 3e-3: .75}, "low") == pytest.approx(1e-4)


def test_plateau_finds_the_level_and_a_curve_still_rising() -> None:
    flat = [(s, min(0.8, s / 250)) for s in range(50, 1001, 50)]
    assert kit.plateau(flat) == {"step": 200, "best": 0.8, "rising": False}
    rising = [(s, s / 2000) for s in range(50, 1001, 50)]
    result = kit.plateau(rising)
    assert result["rising"] and result["step"] == 1000
    assert kit.plateau([])["step"] == 0 and math.isnan(kit.plateau([])["best"])


class FakeRunner:
    """Stands in for a task's backbone: validation peaks at lr 3e-3 for every method; records what ran."""

    ran: list[tuple[str, str, float | None, int]] = []

    def __init__(self, name: str, protocol, device) -> None:  # type: ignore[no-untyped-def]
        self.name = name

    def release(self, method: str) -> None:
        pass

    def run(self, method: str, lr: float | None, seed: int) -> dict:
        FakeRunner.ran.append((self.name, method, lr, seed))
        val = 0.6 if lr is None else 0.8 - 0.05 * abs(math.log10(lr / 3e-3))
        return {"task": self.name, "method": method, "lr": lr, "seed": seed, "access": "black-box",
                "primary": "accuracy", "steps": 10, "best_val": val, "best_step": 10, "trainable_parameters": 5,
                "curve": [] if lr is None else [[5, val - 0.1, 1.0], [10, val, 0.9]],
                "test": {"accuracy": val - 0.01}, "seconds": 0.1}


def test_study_selects_on_seed_0_extends_at_an_edge_and_resumes(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(converged, "TaskRunner", FakeRunner)
    FakeRunner.ran = []
    protocol = converged.Protocol(steps=10, eval_every=5)
    out = tmp_path / "raw.json"
    converged.study(converged.Store(out, protocol), ["text"], ["zero-shot", "output"], [0, 1, 2], extend=1)
    # output's registry rate is 1e-3: grid 3e-4/1e-3/3e-3, 3e-3 wins at the edge, 1e-2 is tried, 3e-3 stays
    assert FakeRunner.ran == [("text", "zero-shot", None, 0)] + [("text", "output", lr, 0) for lr in
                                                                 (3e-4, 1e-3, 3e-3, 1e-2)] + [
        ("text", "output", 3e-3, 1), ("text", "output", 3e-3, 2)]
    FakeRunner.ran = []
    converged.study(converged.Store(out, protocol), ["text"], ["zero-shot", "output"], [0, 1, 2], extend=1)
    assert FakeRunner.ran == []  # everything is in the raw file already
    with pytest.raises(SystemExit, match="steps 10 there, 20 now"):
        converged.Store(out, converged.Protocol(steps=20, eval_every=5))

    small = tmp_path / "small.json"
    small.write_text(json.dumps({"steps": 60, "rows": [
        {"setting": "text", "method": "output", "seed": s, "test": {"accuracy": 0.7}} for s in (0, 1, 2)]}))
    converged_table.main(["--raw", str(out), "--small", str(small), "--figures", str(tmp_path)])
    assert (tmp_path / "converged-text.png").stat().st_size > 0
    summary = converged_table.summarise(json.loads(out.read_text())["runs"], 0.01)["output"]
    assert summary["lr"] == pytest.approx(3e-3) and summary["edge"] == ""
    assert [r["seed"] for r in summary["runs"]] == [0, 1, 2]


def test_a_partial_study_says_so_in_the_table() -> None:
    """A method whose grid or seeds are still running shows its seed count and "grid unfinished"."""
    runs = [FakeRunner("text-b2n", None, None).run("output", lr, 0) for lr in (3e-4, 1e-3, 3e-3)]
    runs += [FakeRunner("text-b2n", None, None).run("output", 3e-3, seed) for seed in (1, 2)]
    runs += [FakeRunner("text-b2n", None, None).run("dga", 1e-3, 0)]
    for run in runs:
        run["test"] = {"base_accuracy": 0.9, "novel_accuracy": 0.7, "harmonic_mean": 0.79, "accuracy": 0.7}
    lines = converged_table.b2n_table("text-b2n", converged_table.summarise(runs, 0.01),
                                      asdict(converged.Protocol()))
    output = next(line for line in lines if line.startswith("| output "))
    dga = next(line for line in lines if line.startswith("| dga "))
    assert "| 0.003 (high edge) | 3 | 90.0 ± 0.0 |" in output and "unfinished" not in output
    assert "| 0.001 (grid unfinished) | 1 | 90.0 |" in dga
