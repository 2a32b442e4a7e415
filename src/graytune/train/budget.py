"""Forward calls through the boundary, counted per phase, and a budget of them (``--max-calls``).

Calls are counted the way black-box tuning papers count them (one batched forward = one call)
and in samples, training and validation apart. A budget is held exactly: during a training
step the model's handle is a ``MeteredHandle`` that refuses the call past the budget before it
is sent.

Example:
    >>> calls = no_calls()
    >>> with counted(model, calls, "train", allowed=100):
    ...     task.loss(model, batch)
    >>> calls["train"], calls["train_samples"]
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from graytune.access import metered
from graytune.model import AdaptedModel
from graytune.train.config import TrainConfig


@contextmanager
def counted(model: AdaptedModel, calls: dict[str, int], phase: str, allowed: int | None = None) -> Iterator[None]:
    """Add the forward calls and samples ``model`` sends inside the block to ``calls[phase]``/``[phase_samples]``.

    With ``allowed``, the call past that many is refused before it is sent (``BudgetSpent``).
    """
    handle = model.handle
    exposure = handle.exposure
    queries, samples = exposure.forward_queries, exposure.forward_samples
    if allowed is not None:
        model.handle = metered(handle, allowed)
    try:
        yield
    finally:
        model.handle = handle
        calls[phase] += exposure.forward_queries - queries
        calls[f"{phase}_samples"] += exposure.forward_samples - samples


def affordable(config: TrainConfig, calls: dict[str, int]) -> bool:
    """Whether another step fits in ``max_calls`` (its cost: the last step's; unknown before the first)."""
    return not config.max_calls or calls["train"] + calls["step"] <= config.max_calls


def allowance(config: TrainConfig, calls: dict[str, int]) -> int | None:
    """The training calls left in ``max_calls`` (None: no budget)."""
    return config.max_calls - calls["train"] if config.max_calls else None


def call_fields(calls: dict[str, int]) -> dict[str, int]:
    """The run's call counts as history lines name them: ``train_calls``, ``train_samples``, ``val_calls``, ..."""
    return {"train_calls": calls["train"], "train_samples": calls["train_samples"], "val_calls": calls["val"],
            "val_samples": calls["val_samples"]}
