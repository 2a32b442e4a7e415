"""Forward calls through the boundary, counted two ways per phase, and a budget of them (``--max-calls``).

Two counts, both kept (``CALL_UNITS`` says what each key counts):

- **tower calls** (``train``, ``val``; ``train_calls`` in history lines): one per batched forward of one
  tower, what the boundary sends and a server meters. A two-tower loss (class prompts and queries,
  images and captions) is two of them.
- **model evaluations** (``train_evaluations``): one per loss evaluated on one batch, every tower it needs
  included: what ZIP and BlackVIP count as an API call (their ``API_calls += 2`` per two-point direction,
  one ``model(image)`` running both towers). On a CLIP-like two-tower task it is half the tower calls.
  They count training only; so does this.

Samples are counted too, training and validation apart. ``--max-calls`` bounds the training tower calls,
exactly: during a training step the model's handle is a ``MeteredHandle`` that refuses the call past
the budget before it is sent. A budget of N model evaluations, as ZIP and BlackVIP state theirs, is
``--max-calls 2N`` on a two-tower task.

Example:
    >>> calls = no_calls()
    >>> with counted(model, calls, "train", allowed=100):
    ...     evaluated(lambda: task.loss(model, batch), calls, "train")()
    >>> calls["train"], calls["train_evaluations"], calls["train_samples"]    # 2, 1, 64 on a two-tower task
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from graytune.access import metered
from graytune.model import AdaptedModel
from graytune.train.config import TrainConfig

T = TypeVar("T")

#: What each count in ``history.jsonl`` means (its first line carries this, so a reader knows the units).
CALL_UNITS = {
    "train_calls": "training forward calls through the boundary, one per batched forward of one tower "
                   "(a two-tower loss evaluation is 2); what --max-calls bounds and a server meters",
    "train_evaluations": "training model evaluations, one per loss on one batch with every tower it needs: "
                         "what ZIP and BlackVIP count as API calls (tower calls / 2 on a two-tower task)",
    "val_calls": "validation forward calls, one per batched forward of one tower",
}


@contextmanager
def counted(model: AdaptedModel, calls: dict[str, int], phase: str, allowed: int | None = None) -> Iterator[None]:
    """Add the tower calls and samples ``model`` sends inside the block to ``calls[phase]``/``[phase_samples]``.

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


def evaluated(loss_of: Callable[[], T], calls: dict[str, int], phase: str = "train") -> Callable[[], T]:
    """``loss_of`` that adds one to ``calls[phase + "_evaluations"]`` each time it returns (a whole evaluation)."""

    def evaluation() -> T:
        value = loss_of()
        calls[f"{phase}_evaluations"] += 1
        return value

    return evaluation


def restore_evaluations(calls: dict[str, int], steps: int, grad_accum: int, source: Any) -> None:
    """Fill in the evaluations of a checkpoint written before they were counted (``-1``): every step it holds
    was whole, so they were ``steps × grad_accum × the source's evaluations per batch`` (2q zeroth-order, else 1)."""
    if calls.get("train_evaluations", 0) < 0:
        per_batch = source.evaluations_per_batch() if hasattr(source, "evaluations_per_batch") else 1
        calls["train_evaluations"] = steps * grad_accum * per_batch


def affordable(config: TrainConfig, calls: dict[str, int]) -> bool:
    """Whether another step fits in ``max_calls`` (its cost: the last step's; unknown before the first)."""
    return not config.max_calls or calls["train"] + calls["step"] <= config.max_calls


def allowance(config: TrainConfig, calls: dict[str, int]) -> int | None:
    """The training tower calls left in ``max_calls`` (None: no budget)."""
    return config.max_calls - calls["train"] if config.max_calls else None


def call_fields(calls: dict[str, int]) -> dict[str, int]:
    """The run's call counts as history lines name them: ``train_calls`` (per tower), ``train_evaluations``
    (per model evaluation), ``train_samples``, ``val_calls``, ``val_samples``."""
    return {"train_calls": calls["train"], "train_evaluations": calls["train_evaluations"],
            "train_samples": calls["train_samples"], "val_calls": calls["val"], "val_samples": calls["val_samples"]}
