"""Metric scale: 0–1 in every JSON, artifact and history (CLIP_benchmark's convention); percentages only
in printed tables, labelled.

Example:
    >>> as_percent({"accuracy": 0.614, "image_retrieval_median_rank": 3.0})
    {'accuracy': 61.4, 'image_retrieval_median_rank': 3.0}
"""

from __future__ import annotations

from collections.abc import Mapping


#: metric names that are no fraction: ranks, times, losses (a language model's per-token NLL, a diffusion model's
#: denoising error and its negative, the score it is selected on), a judge's raw cosines in [-1, 1] (CLIP-T, CLIP-I)
NOT_FRACTIONS = ("median_rank", "_seconds", "_s", "nll", "_mse", "denoise_score", "clip_t", "clip_i")


def is_fraction(key: str) -> bool:
    """Whether metric ``key`` is a fraction in [0, 1] (recalls, accuracies, mAP, P@k, harmonic mean)."""
    return not key.endswith(NOT_FRACTIONS)


def as_percent(metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` with fractions shown as percentages (for printed tables only)."""
    return {k: 100.0 * v if is_fraction(k) else v for k, v in metrics.items()}


def label(key: str) -> str:
    """A printed column name: ``accuracy %`` for fractions, the key itself otherwise."""
    return f"{key} %" if is_fraction(key) else key
