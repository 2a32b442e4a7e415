"""The CLIP-scale table's machinery on ``arch:clip-tiny`` (structure and finite ratios; no timing assertions)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from graytune.bench import clip_scale
from graytune.cli.main import main
from graytune.errors import InvalidInputError, UnknownNameError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops on 2 threads of a busy 2-core machine wait on each other (~10 ms per matmul); 1 thread does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def results() -> dict:
    return clip_scale.run(["clip-tiny"], batches=[2], dtypes=["fp32"], methods=["output", "dga"], device="cpu",
                          steps=1, warmup=0, interleaved_rounds=2, cosine=False, progress=False, isolate=False)


def test_every_cell_is_measured_with_positive_finite_ratios(results: dict) -> None:
    (table,) = results["tables"]
    assert (table["arch"], table["batch"], table["dtype"]) == ("clip-tiny", 2, "fp32")
    assert table["weights_mb"] > 0 and table["params"] > 0
    rows = {(r["method"], r["recompute"]): r for r in table["rows"]}
    # full and native always run, as references without recomputation; recomputation only where a gradient
    # crosses the backbone
    assert set(rows) == {("output", False), ("dga", False), ("dga", True), ("full", False), ("native", False)}
    for row in rows.values():
        assert "error" not in row, row
        assert row["total_mb"] == pytest.approx(table["weights_mb"] + row["step_peak_mb"])
        for key in ("memory_vs_full", "memory_vs_native", "step_peak_vs_native", "time_vs_full", "time_vs_native"):
            assert row[key] > 0 and math.isfinite(row[key]), (row["method"], key)
    assert rows[("full", False)]["memory_vs_full"] == pytest.approx(1.0)
    assert rows[("native", False)]["time_vs_native"] == pytest.approx(1.0)
    # full fine-tuning's step creates a gradient and two AdamW moments per weight; the adapters' do not
    assert rows[("full", False)]["step_peak_mb"] > 2 * table["weights_mb"]
    assert rows[("dga", False)]["trainable"] < rows[("full", False)]["trainable"]
    ab = table["interleaved"]  # native, dga and dga recomputed, timed round by round in one process
    assert ab["rounds"] == 2 and all(len(v) == 2 for v in ab["all_s"].values())
    assert ab["dga_recompute_vs_native"] > 0 and math.isfinite(ab["dga_recompute_vs_native"])


def test_targets_and_report_name_every_row(results: dict) -> None:
    names = [t["target"] for t in results["targets"]]
    assert any(n.startswith("DGA memory") for n in names) and any(n.startswith("owner recomputation") for n in names)
    assert all(t["status"] in ("PASS", "FAIL", "info", "GPU", "n/a") for t in results["targets"])
    text = clip_scale.format_report(results)
    assert "clip-tiny  batch 2" in text and "native" in text and "targets" in text and "interleaved" in text
    assert results["machine"]["torch"] in text
    json.dumps(results)  # --json prints it


def test_bf16_vjp_stays_close_to_fp32() -> None:
    cos = clip_scale.vjp_cosine("clip-tiny", batch=2, device="cpu")
    assert cos["dtype"] == "bf16"
    for port in ("image.pixels", "text.token_embeds", "image.embeds", "text.embeds"):
        assert 0.9 < cos[port] <= 1.0 + 1e-6, port


def test_a_fresh_process_prints_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    cell = clip_scale.Cell("clip-tiny", "zero-shot", "fp32", False, 2, "cpu", steps=1, warmup=0)
    clip_scale._main(["cell", json.dumps(clip_scale.asdict(cell))])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["trainable"] == 0 and row["step_peak_mb"] >= 0 and row["time_s"] > 0


def test_unknown_names_and_misplaced_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UnknownNameError, match="clip-vit-b-16"):
        clip_scale.run(["clip-vit-b16"], methods=["dga"], device="cpu", progress=False, isolate=False)
    with pytest.raises(InvalidInputError, match="logits"):
        clip_scale.check_methods(["transmiter"])
    with pytest.raises(InvalidInputError, match="zeroth-order"):
        clip_scale.check_methods(["dga-zo"])
    assert main(["bench", "--batch", "4"]) == 2
    assert "--arch" in capsys.readouterr().err
