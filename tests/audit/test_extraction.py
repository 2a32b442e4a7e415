"""The surrogate gets close to a tiny backbone with a large budget and stays far with a tiny one."""

from __future__ import annotations

from graytune.audit import AuditConfig, run_audit


def _final(report: dict, level: str, mode: str = "vjp") -> dict:  # type: ignore[type-arg]
    return report["levels"][level]["extraction"][mode]["checkpoints"][-1]


def test_fidelity_grows_with_the_budget(tiny_clip, image_data) -> None:
    config = dict(levels=("dark-gray",), rows=32, probe_train=200, probe_test=200, steps_per_call=2, cotangents=1)
    tiny = run_audit(tiny_clip, AuditConfig(budget=2, **config), data=image_data, progress=False).data
    large = run_audit(tiny_clip, AuditConfig(budget=40, **config), data=image_data, progress=False).data
    small, big = _final(tiny, "dark-gray"), _final(large, "dark-gray")
    assert big["explained_variance"] > 0.6 and small["explained_variance"] < 0.25, (small, big)
    assert big["probe_ratio"] > small["probe_ratio"] + 0.15 and big["agreement"] > small["agreement"] + 0.15
    assert big["cosine"] > 0.99
    reference = large["reference"]["probe_accuracy"]
    assert reference > 0.8  # the labels are the backbone's own: its probe finds them
    assert big["probe_accuracy"] == round(big["probe_ratio"] * reference, 4) or abs(
        big["probe_accuracy"] - big["probe_ratio"] * reference) < 1e-3
    # the same run gives the curve: its checkpoint at 2 calls is the tiny run's end
    curve = large["levels"]["dark-gray"]["extraction"]["vjp"]["checkpoints"]
    assert curve[1] == small | {"seconds": curve[1]["seconds"]}


def test_black_box_learns_from_outputs_alone(tiny_clip, image_data) -> None:
    config = AuditConfig(levels=("black-box",), budget=5, rows=16, probe_train=100, probe_test=100,
                         steps_per_call=2)
    level = run_audit(tiny_clip, config, data=image_data, progress=False).data["levels"]["black-box"]
    outputs, differences = level["extraction"]["outputs"], level["extraction"]["differences"]
    assert outputs["spent"]["vjps"] == 0 and outputs["attack"].startswith("outputs only")
    # moved pixels are plain inputs: finite differences need no edit on an image tower
    assert differences["spent"]["vjps"] == 0 and differences["spent"]["edit_rows"] == 0
    assert level["finite_differences"]["edits"].startswith("none: the pixels are the raw input")
    assert level["duplicate_rows"]["status"] == "not applicable"
    assert "embedding_geometry" not in level  # an image tower has no token table
    assert level["recommended_quota"]["flags"]["--black-box-edits"] is None
