"""The language-model benchmark's machinery on ``arch:llama-tiny`` (what it computes and reports; no timing asserted).

The figures themselves come from ``make bench`` (docs/benchmarks.md, "Language models").
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from graytune.access import open_backbone
from graytune.bench import lm
from graytune.bench.lm_steps import LM_METHODS, NATIVE, boundary_loss, lm_batch, plain_loss, vocab_size
from graytune.cli.main import build_parser
from graytune.errors import UnknownNameError
from graytune.model import AdaptedModel
from graytune.train.completions import IGNORE

TINY = lm.Scale("arch:llama-tiny", 3, 12)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops on 2 threads of a busy 2-core machine wait on each other; 1 thread does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def results() -> dict:
    return lm.run(overhead=TINY, scales=[TINY], rounds=2, isolate=False, progress=False)


def test_the_batch_is_laid_out_as_completions() -> None:
    batch = lm_batch(vocab=128, batch=4, length=12)
    ids, mask, targets = batch["text.input_ids"], batch["text.attention_mask"], batch["text.target_ids"]
    assert ids.shape == mask.shape == targets.shape == (4, 12)
    assert mask.sum(1).tolist() == [6, 8, 10, 12]  # right-padded, lengths spread over the last 6 positions
    for row in range(4):
        n = int(mask[row].sum())
        kept = (targets[row] != IGNORE).nonzero().flatten()
        assert kept.max() == n - 2  # the last real token predicts nothing
        assert torch.equal(targets[row, kept], ids[row, kept + 1])  # position t predicts token t + 1
        assert (targets[row, n - 1:] == IGNORE).all()


def test_plain_autograd_computes_what_the_boundary_computes() -> None:
    """The overhead's two sides are the same computation: equal loss and equal gradients at the adapter."""
    model = AdaptedModel.build(open_backbone(TINY.backbone, "dark-gray"), "dga")
    (adapter,) = model.text_adapters
    with torch.no_grad():
        adapter.shift.normal_(0, 0.1)  # a non-zero shift, so the masking of padding matters
    batch = lm_batch(vocab_size(model.handle), TINY.batch, TINY.length)
    lm_module = open_backbone(TINY.backbone, "white-box").module()
    shift, extra = (t.detach().clone().requires_grad_() for t in (adapter.shift, adapter.extra))
    ours, theirs = boundary_loss(model, batch), plain_loss(lm_module, batch, shift, extra)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.shift.grad, shift.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(adapter.extra.grad, extra.grad, rtol=1e-4, atol=1e-6)


def test_every_method_is_measured_with_ratios_to_full_fine_tuning(results: dict) -> None:
    o = results["overhead"]
    assert o["rounds"] == 2 and len(o["boundary_all_s"]) == len(o["plain_all_s"]) == 2
    assert all(math.isfinite(o[k]) and o[k] > 0 for k in ("ratio", "min_ratio"))
    (table,) = results["memory"]
    rows = table["rows"]
    assert list(rows) == [*LM_METHODS, NATIVE]
    for method, row in rows.items():
        assert "error" not in row, (method, row)
        assert row["total_mb"] == pytest.approx(table["weights_mb"] + row["step_peak_mb"])
        assert row["vs_full"] > 0 and math.isfinite(row["vs_full"]), method
    assert rows["full"]["vs_full"] == pytest.approx(1.0) and rows[NATIVE]["vs_native"] == pytest.approx(1.0)
    assert rows["full"]["trainable"] == table["params"] and rows["zero-shot"]["trainable"] == 0
    # full fine-tuning's step makes a gradient and two AdamW moments of every weight; an adapter's does not
    assert rows["full"]["step_peak_mb"] > 2.5 * table["weights_mb"]
    assert all(rows[m]["trainable"] < rows["full"]["trainable"] for m in LM_METHODS if m != "full")


def test_the_report_names_every_row_and_the_machine(results: dict) -> None:
    text = lm.format_report(results)
    assert "LM boundary overhead: arch:llama-tiny" in text and "target <= 1.03" in text
    assert all(f"\n{m:<11}" in text for m in [*LM_METHODS, NATIVE])
    assert results["machine"]["torch"] in text and "all rows in one process" in text
    json.dumps(results)  # --json prints it


def test_full_fine_tuning_says_when_it_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lm, "_available_mb", lambda: 0.01)
    row = lm.memory_cell(TINY.backbone, "full", TINY.batch, TINY.length)
    assert row["error"].startswith("does not fit: full fine-tuning with AdamW") and "step_peak_mb" not in row
    table = lm._table(TINY, {"full": row, "dga": {"trainable": 64, "step_peak_mb": 1.0}})
    dga = table["rows"]["dga"]
    assert "vs_full" not in dga  # no measured reference: the ratio is to full fine-tuning's floor, an upper bound
    assert table["full_floor_mb"] == pytest.approx(4 * row["weights_mb"])
    assert dga["vs_full_floor"] == pytest.approx((row["weights_mb"] + 1.0) / (4 * row["weights_mb"]))
    text = "\n".join(lm._table_lines(table))
    assert "does not fit" in text and "<=" in text and "full fine-tuning did not run" in text


def test_a_fresh_process_prints_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    lm._main(["cell", json.dumps({"backbone": TINY.backbone, "method": "prompt-zo", "batch": 2, "length": 8})])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["trainable"] > 0 and row["step_peak_mb"] >= 0


def test_unknown_methods_are_refused_and_the_cli_can_skip_language_models() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'lora'"):
        lm.run(overhead=None, scales=[TINY], methods=["lorra"], isolate=False, progress=False)
    assert build_parser().parse_args(["bench", "--no-lm"]).lm is False
    assert build_parser().parse_args(["bench"]).lm is True
