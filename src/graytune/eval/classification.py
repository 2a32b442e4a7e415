"""Classification metrics: accuracy within class groups (base / novel) and their harmonic mean.

Example:
    >>> split_accuracy(scores, labels, {"base": (0, 1, 2, 3, 4), "novel": (5, 6, 7, 8, 9)})
    {'base_accuracy': 61.2, 'novel_accuracy': 20.4, 'harmonic_mean': 30.6}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def split_accuracy(scores: torch.Tensor, labels: torch.Tensor, splits: Mapping[str, Sequence[int]]
                   ) -> dict[str, float]:
    """Per group: accuracy (0–1) among the group's classes on the group's samples; ``harmonic_mean`` of
    base and novel when both groups are given. ``scores`` is ``[N, C]`` over all classes."""
    out: dict[str, float] = {}
    for name, classes in splits.items():
        cls = torch.as_tensor(list(classes))
        rows = torch.isin(labels, cls)
        if rows.any():
            pred = cls[scores[rows][:, cls].argmax(1)]
            out[f"{name}_accuracy"] = float((pred == labels[rows]).float().mean())
    if {"base_accuracy", "novel_accuracy"} <= set(out):
        b, n = out["base_accuracy"], out["novel_accuracy"]
        out["harmonic_mean"] = 2 * b * n / (b + n) if b + n > 0 else 0.0
    return out
