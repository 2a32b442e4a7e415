"""The quota rule: 10x below the last checkpoint under 90 % of the backbone's probe accuracy."""

from __future__ import annotations

from graytune.audit import recommend
from graytune.audit.report import combine


def _curve(*points: tuple[int, float]) -> list[dict]:  # type: ignore[type-arg]
    return [{"calls": c, "samples": 32 * c, "grad_rows": 0, "probe_ratio": r} for c, r in points]


def test_the_quota_stays_ten_times_below_the_crossing() -> None:
    found = recommend(_curve((0, 0.5), (100, 0.8), (200, 0.88), (500, 0.93), (1000, 0.95)), 1000)
    assert found["calls_to_90"] == {"more_than": 200, "at_most": 500}
    assert found["quota"] == {"calls": 20, "samples": 640, "grad_rows": 0}


def test_not_reached_and_not_measurable_say_so() -> None:
    found = recommend(_curve((0, 0.5), (10, 0.7)), 10)
    assert found["quota"] == "not reached within the budget" and found["best_probe_ratio"] == 0.7
    assert "at most a quota of 1 calls" in found["note"]
    assert recommend(_curve((0, 0.95), (10, 0.97)), 10)["quota"] == "not measurable"
    early = recommend(_curve((0, 0.5), (2, 0.8), (5, 0.95)), 5)
    assert early["quota"]["calls"] == 0 and "no quota in calls" in early["note"]


def test_a_level_inherits_a_lower_levels_smaller_quota() -> None:
    black = recommend(_curve((0, 0.5), (100, 0.8), (200, 0.95)), 200)
    dark = recommend(_curve((0, 0.5), (100, 0.8), (200, 0.85)), 200)
    levels = {"dark-gray": {"extraction_quota": dark}, "black-box": {"extraction_quota": black}}
    combine(levels)
    assert levels["black-box"]["recommended_quota"]["quota"]["calls"] == 10
    assert levels["dark-gray"]["recommended_quota"]["quota"]["calls"] == 10
    assert levels["dark-gray"]["recommended_quota"]["from_level"] == "black-box"
