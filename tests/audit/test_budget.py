"""Calls are counted as the black-box papers count them, and no attack spends more than its budget."""

from __future__ import annotations

import pytest
import torch

import graytune
from graytune.audit import AuditConfig, CallMeter, run_audit
from graytune.audit.extraction import log_checkpoints


def test_checkpoints_are_log_spaced_and_end_at_the_budget() -> None:
    assert log_checkpoints(1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert log_checkpoints(7) == [1, 2, 5, 7]
    assert log_checkpoints(1) == [1]


def test_a_forward_is_one_call_and_its_vjp_another(tiny_clip) -> None:
    handle = graytune.open_backbone(tiny_clip, "dark-gray")
    meter = CallMeter(handle, budget=3)
    with torch.no_grad():
        handle.encode_text(["ab cd", "ef"])  # one batched forward of 2 rows: one call
    assert meter.spent() == {"calls": 1, "forwards": 1, "vjps": 0, "samples": 2, "grad_rows": 0, "edit_rows": 0}
    pixels = torch.zeros(4, 3, 32, 32, requires_grad=True)
    handle.encode_image(pixels).sum().backward()  # a forward and its VJP: two calls
    assert (meter.calls, meter.forwards, meter.vjps, meter.samples) == (3, 2, 1, 6)
    assert not meter.afford(1) and CallMeter(handle, budget=0).calls == 0  # a new meter starts from zero


@pytest.mark.parametrize("budget", [1, 7])
def test_no_attack_spends_more_than_the_budget(tiny_clip, text_data, budget) -> None:
    config = AuditConfig(levels=("black-box", "dark-gray"), budget=budget, rows=8, reads=("text.token_embeds",),
                         modality="text", probe_train=50, probe_test=50, steps_per_call=1)
    report = run_audit(tiny_clip, config, data=text_data, progress=False).data
    spent = {f"{level}/{name}": part["spent"] for level, found in report["levels"].items()
             for name, part in [*found.items(), *found["extraction"].items()] if isinstance(part, dict)
             and "spent" in part}
    assert {"black-box/outputs", "black-box/differences", "black-box/finite_differences", "dark-gray/vjp",
            "dark-gray/duplicate_rows", "dark-gray/exact_rows"} <= set(spent) or budget == 1
    for name, part in spent.items():
        assert part["calls"] == part["forwards"] + part["vjps"] <= budget, name
    black = report["levels"]["black-box"]["extraction"]
    assert black["outputs"]["spent"]["calls"] == budget and black["outputs"]["spent"]["samples"] == 8 * budget
    # 4 texts a call, each as it is and under one edit (--fd-edits 1): every row of those calls is an edit row
    assert black["differences"]["spent"] == {"calls": budget, "forwards": budget, "vjps": 0, "samples": 8 * budget,
                                             "grad_rows": 0, "edit_rows": 8 * budget}
    dark = report["levels"]["dark-gray"]["extraction"]["vjp"]
    assert dark["spent"]["calls"] == budget - budget % 2  # forward + VJP pairs
    assert dark["spent"]["grad_rows"] == 8 * (budget // 2)  # 8 texts, a cotangent each (--cotangents 1), a pair
    assert report["total_attack_calls"] == sum(part["calls"] for part in spent.values())
    calls = [c["calls"] for c in dark["checkpoints"]]
    assert calls == sorted(calls) and calls[0] == 0
