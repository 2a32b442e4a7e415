"""The token-table attacks and the duplicate-row Jacobian, in process and against graytune serve."""

from __future__ import annotations

import pytest
import torch

import graytune
from graytune.audit import AuditConfig, run_audit
from tests.audit.conftest import KEY

CONFIG = dict(rows=8, modality="text", probe_train=50, probe_test=50, steps_per_call=1, geometry_calls=15,
              geometry_tokens=8)


@pytest.fixture(scope="module")
def text_report(tiny_clip, text_data) -> dict:  # type: ignore[type-arg]
    config = AuditConfig(levels=("black-box", "dark-gray"), budget=15, reads=("text.token_embeds",), **CONFIG)
    return run_audit(tiny_clip, config, data=text_data, progress=False).data


def test_duplicate_rows_give_the_whole_jacobian_in_two_calls(text_report) -> None:
    found = text_report["levels"]["dark-gray"]["duplicate_rows"]
    assert found["status"] == "recovered" and found["spent"] == {"calls": 2, "forwards": 1, "vjps": 1, "samples": 16,
                                                                  "grad_rows": 16, "edit_rows": 0}
    assert found["jacobian_shape"][0] == 16 and found["jacobian_shape"][2] == 32  # [E, L, D]
    assert found["finite_difference_error"] < 1e-2  # the rows are the Jacobian's (checked by the owner)
    assert "one row per call would take 32 calls" in found["compression"]
    assert text_report["levels"]["black-box"]["duplicate_rows"]["status"] == "not applicable"


def test_black_box_gets_the_jacobian_by_finite_differences_and_the_report_says_so(text_report) -> None:
    black = text_report["levels"]["black-box"]
    found = black["finite_differences"]
    assert found["status"] == "recovered" and found["spent"]["vjps"] == 0 and found["relative_error"] < 1e-2
    edits = black["recommended_quota"]["edits"]
    assert black["recommended_quota"]["flags"]["--black-box-edits"] == "refuse"
    assert edits["for_zeroth_order_keys"] == "count" and edits["full_jacobian"]["edit_rows"] == found["spent"][
        "edit_rows"]
    assert "finite differences" in black["recommended_quota"]["why"]
    sizes = black["extraction"]["outputs"]["student_size"]
    assert sizes["token_table"] == text_report["levels"]["dark-gray"]["extraction"]["vjp"]["student_size"][
        "token_table"] > 0
    assert black["extraction"]["outputs"]["student_parameters"] == sizes["total"] > sizes["token_table"]


def test_a_read_grant_hands_over_the_rows(text_report) -> None:
    rows = text_report["levels"]["dark-gray"]["exact_rows"]
    assert rows["fraction"] == 1.0 and rows["max_abs_error"] == 0.0
    assert rows["spent"]["calls"] == rows["calls_for_whole_table"] == 1 and "no attack is needed" in rows["note"]
    assert "exact_rows" not in text_report["levels"]["black-box"]  # a read needs dark-gray
    assert text_report["levels"]["black-box"]["reads"] == [] and text_report["levels"]["dark-gray"]["reads"] == [
        "text.token_embeds"]


def test_the_geometry_probe_learns_rows_through_vjps(text_report) -> None:
    geometry = text_report["levels"]["dark-gray"]["embedding_geometry"]
    assert geometry["spent"]["calls"] <= 15 and geometry["tokens"] == 8
    curve = geometry["checkpoints"]
    assert curve[-1]["output_error"] < curve[0]["output_error"]
    assert -1.0 <= geometry["pairwise_cosine_correlation"] <= 1.0 and geometry["row_error"] >= 0
    assert text_report["levels"]["black-box"]["embedding_geometry"]["status"] == "not applicable"


def test_the_recommended_dark_gray_quota_allows_gradients(text_report, serve_tiny) -> None:
    """Issue 32: the recommendation copied black-box's --quota-grad-rows 0 into dark-gray. Applied to a server,
    a level's quota must let its own operation through: one call of the audit's rows forward, and its VJP."""
    flags = text_report["levels"]["dark-gray"]["recommended_quota"]["flags"]
    rows = text_report["rows_per_call"]
    width = text_report["levels"]["dark-gray"]["duplicate_rows"]["jacobian_shape"][2]
    assert flags["--quota-grad-rows"] >= rows and flags["--quota-samples"] >= rows
    url = serve_tiny(quota_samples=flags["--quota-samples"], quota_grad_rows=flags["--quota-grad-rows"])
    remote = graytune.open_backbone(url, "dark-gray", api_key=KEY)
    shift = torch.zeros(1, 1, width, requires_grad=True)
    texts = [f"row {i}" for i in range(rows)]
    remote.forward({"text": texts}, add={"text.token_embeds": shift})["text.embeds"].sum().backward()
    assert shift.grad is not None and remote.stats()["grad_rows_used"] == rows


def test_a_server_that_refuses_duplicate_rows_is_reported(serve_tiny, tiny_clip, text_data) -> None:
    url = serve_tiny(duplicate_rows="refuse")
    config = AuditConfig(levels=("dark-gray",), budget=4, **CONFIG)
    found = run_audit(url, config, api_key=KEY, data=text_data, progress=False).data["levels"]["dark-gray"]
    dup = found["duplicate_rows"]
    assert dup["status"] == "refused" and "--duplicate-rows refuse" in dup["stopped"]
    # the attack's copies of a text differ by a tiny edit: distinct rows, served as usual
    assert found["extraction"]["vjp"]["spent"]["calls"] == 4 and found["extraction"]["vjp"]["stopped"] is None
    assert "note" in found["embedding_geometry"]  # no read grant on the server: the geometry is left unscored
    assert "pairwise_cosine_correlation" not in found["embedding_geometry"]


def test_a_server_that_counts_duplicate_rows_is_reported(serve_tiny, text_data) -> None:
    url = serve_tiny(duplicate_rows="count", reads=("text.token_embeds",))
    config = AuditConfig(levels=("dark-gray",), budget=4, **CONFIG)
    report = run_audit(url, config, api_key=KEY, data=text_data, progress=False).data
    dup = report["levels"]["dark-gray"]["duplicate_rows"]
    assert dup["status"] == "recovered"
    assert dup["server_counted"] == {"duplicate_row_batches": 1, "duplicate_rows": 15, "duplicate_rows_policy": "count"}
    assert report["served"] and "pairwise_cosine_correlation" in report["levels"]["dark-gray"]["embedding_geometry"]
    stats = graytune.open_backbone(url, "dark-gray", api_key=KEY).stats()
    assert stats["duplicate_row_batches"] == 1
    # the server's own ledger agrees with the audit's count of what crossed the boundary
    level = report["levels"]["dark-gray"]
    attacks = [part["spent"] for part in [*level.values(), *level["extraction"].values()] if isinstance(part, dict)
               and "spent" in part]
    assert stats["samples_used"] == sum(a["samples"] for a in attacks) + report["owner_evaluation_samples"]
    assert stats["grad_rows_used"] == sum(a["grad_rows"] for a in attacks)
