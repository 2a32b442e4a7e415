"""The quota rule: 10x below the last checkpoint under 90 % of the backbone's probe accuracy, in the server's units."""

from __future__ import annotations

from graytune.audit import combine, recommend
from graytune.audit.students import AttentiveBag, ConvStudent, student_size


def _curve(*points: tuple[int, float], samples: int = 32, grad_rows: int = 0, edit_rows: int = 0) -> list[dict]:
    return [{"calls": c, "samples": samples * c, "grad_rows": grad_rows * c, "edit_rows": edit_rows * c,
             "probe_ratio": r} for c, r in points]


def _level(**curves: list[dict]) -> dict:  # type: ignore[type-arg]
    return {"extraction": {mode: {"checkpoints": curve} for mode, curve in curves.items()},
            "extraction_quota": {mode: recommend(curve, curve[-1]["calls"]) for mode, curve in curves.items()}}


def test_the_quota_stays_ten_times_below_the_crossing() -> None:
    found = recommend(_curve((0, 0.5), (100, 0.8), (200, 0.88), (500, 0.93), (1000, 0.95)), 1000)
    assert found["calls_to_90"] == {"more_than": 200, "at_most": 500}
    assert found["quota"] == {"calls": 20, "samples": 640, "grad_rows": 0, "edit_rows": 0}


def test_not_reached_gives_a_safe_quota_and_not_measurable_none() -> None:
    found = recommend(_curve((0, 0.5), (10, 0.7)), 10)
    assert not found["reached"] and found["quota"]["calls"] == 1 and found["best_probe_ratio"] == 0.7
    assert "stayed below 90%" in found["note"]
    assert recommend(_curve((0, 0.95), (10, 0.97)), 10)["quota"] == "not measurable"


def test_the_dark_gray_recommendation_allows_gradients() -> None:
    """Issue 32: combine copied black-box's quota, grad_rows 0 included, into dark-gray; graytune serve reads
    --quota-grad-rows 0 as no limit, and read as 'none' it would forbid the level's own operation."""
    levels = {"dark-gray": _level(vjp=_curve((0, 0.5), (100, 0.8), (200, 0.95), samples=16, grad_rows=16)),
              "black-box": _level(outputs=_curve((0, 0.5), (100, 0.8), (200, 0.95)),
                                  differences=_curve((0, 0.5), (50, 0.8), (100, 0.95), edit_rows=32)),
              "light-gray": _level(vjp=_curve((0, 0.5), (100, 0.8), (200, 0.95), samples=16, grad_rows=16))}
    combine(levels)
    black, dark, light = (levels[n]["recommended_quota"] for n in ("black-box", "dark-gray", "light-gray"))
    assert black["flags"] == {"--quota-samples": 160, "--quota-grad-rows": None, "--black-box-edits": None}
    assert "never set it to 0" in black["grad_rows"]["note"]
    assert dark["flags"]["--quota-grad-rows"] == 160 > 0  # from the gradient attack, never black-box's 0
    assert dark["flags"]["--quota-samples"] == 160 and dark["samples"]["from"] == "black-box differences"
    assert light["flags"] == dark["flags"]
    for quota in (black, dark, light):
        assert all(value != 0 for value in quota["flags"].values())
        assert quota["why"].startswith(("black-box sells", "dark-gray sells", "light-gray sells"))


def test_a_crossing_in_the_first_checkpoint_still_lets_one_call_through() -> None:
    """The rule gives 0 here; 0 means no limit to a server, and 1 row (the old floor) refuses every 16-row VJP."""
    levels = {"dark-gray": _level(vjp=_curve((0, 0.5), (5, 0.95), samples=16, grad_rows=16))}
    combine(levels, rows_per_call=16)
    quota = levels["dark-gray"]["recommended_quota"]
    assert quota["flags"]["--quota-grad-rows"] == quota["flags"]["--quota-samples"] == 16
    assert "the least that lets the level's own operation through" in quota["grad_rows"]["note"]
    assert "0 means no limit" in quota["grad_rows"]["note"]


def test_each_level_says_why_its_quota_differs_from_the_level_below() -> None:
    levels = {"black-box": _level(outputs=_curve((0, 0.5), (100, 0.8), (200, 0.95), samples=16)),
              "dark-gray": _level(vjp=_curve((0, 0.5), (50, 0.8), (100, 0.95), samples=8, grad_rows=8))}
    combine(levels, rows_per_call=16)
    black, dark = (levels[n]["recommended_quota"] for n in ("black-box", "dark-gray"))
    assert black["flags"]["--quota-samples"] == 160 and dark["flags"]["--quota-samples"] == 40
    assert black["why"].count("\n") == dark["why"].count("\n") == 0
    assert "so --quota-samples 160 (from black-box outputs)" in black["why"]
    assert "black-box's is 160: this level's attack reached 90 % on fewer samples" in dark["why"]
    assert "--quota-grad-rows 40 (from dark-gray vjp" in dark["why"]


def test_a_students_size_counts_its_token_table() -> None:
    """Issue 32: the text student's token table is a buffer, and the report left it out (738,816 for ~12.5 M)."""
    size = student_size(AttentiveBag(vocab=1000, dim=32, out=16, positions=20))
    assert size["token_table"] == 1000 * 32 and size["total"] == size["token_table"] + size["parameters"]
    assert student_size(ConvStudent(out=16))["token_table"] == 0
