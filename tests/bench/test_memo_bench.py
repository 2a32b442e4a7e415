"""The memoize benchmark runs, sends each gloss to the backbone once when memoized, and reports what it measured.

No timing is asserted: the ratios are read in ``make bench`` (docs/benchmarks.md).
"""

from __future__ import annotations

import math

from graytune.bench import memo


def test_the_memoized_side_sends_each_gloss_once_and_the_report_names_both() -> None:
    r = memo.run(rounds=2, texts=48, batch=16)
    classes = 10  # the class prompts, embedded once through the plain handle
    assert r["backbone_rows"] == {"plain": classes + 48 * 3, "memoized": 48}  # a first epoch and two rounds
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("plain_s", "memoized_s", "ratio", "first_ratio"))
    report = memo.format_report(r)
    assert "48 glosses, batch 16" in report and "plain 154, memoized 48" in report
