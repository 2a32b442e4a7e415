"""Where a run stands (``FitState``, what a checkpoint keeps and a resume checks) and what ``fit`` returns.

Example:
    >>> state = FitState()
    >>> state.step, state.calls["train"]
    (0, 0)
    >>> FitState.from_dict(state.to_dict()) == state
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from graytune.errors import InvalidInputError

#: What ``FitResult.calls`` and ``history.jsonl`` count (``graytune.train.budget``): forward calls through the
#: boundary, one per batched forward of one tower (``train``, ``val``), and samples, training and validation apart;
#: ``train_evaluations``: training model evaluations, one per loss on one batch with all its towers (ZIP's and
#: BlackVIP's count: half of ``train`` on a two-tower task); ``step`` is the tower calls of the last training step
#: (what the next one will cost).
CALL_KEYS = ("train", "train_evaluations", "train_samples", "val", "val_samples", "step")
#: ``calls["train_evaluations"]`` of a checkpoint written before evaluations were counted (the loop fills it in).
UNCOUNTED = -1
#: Why a run ended.
STOPPED = ("max_steps", "patience", "max_calls")


def no_calls() -> dict[str, int]:
    return dict.fromkeys(CALL_KEYS, 0)


@dataclass
class FitState:
    """A run's position and selection record; checkpointed as a plain dict (``to_dict``) and checked on resume.

    Attributes:
        step: optimizer steps taken.
        epoch, batch_in_epoch: where in the data order the next step starts.
        best, best_step: the best validation value so far and its step.
        bad: validations since the best one (for ``patience``).
        history: one row per validation (``step``, ``loss``, ``val_<metric>``, calls).
        best_state: the tunable tensors at the best validation (None before one).
        calls: see ``CALL_KEYS``.
        stopped: why the run ended (``STOPPED``); ``max_steps`` while it runs.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: float = -math.inf
    best_step: int = 0
    bad: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    calls: dict[str, int] = field(default_factory=no_calls)
    stopped: str = "max_steps"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (numbers, strings, tensors): what ``torch.load(weights_only=True)`` reads back."""
        return {**asdict(self), "best_state": self.best_state, "calls": dict(self.calls)}

    @classmethod
    def from_dict(cls, saved: dict[str, Any], where: str = "the checkpoint") -> FitState:
        """The state a checkpoint saved; checkpoints written before ``calls`` and ``stopped`` existed load too.

        Raises:
            InvalidInputError: a field is missing, unknown or of the wrong kind (naming ``where``).
        """
        if not isinstance(saved, dict):
            raise InvalidInputError(f"{where} holds no training state (got {type(saved).__name__})")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(saved) - names)
        missing = sorted({"step", "epoch", "batch_in_epoch", "best", "best_step", "bad"} - set(saved))
        problems = [f"unknown fields {unknown}"] if unknown else []
        problems += [f"missing fields {missing}"] if missing else []
        for name in ("step", "epoch", "batch_in_epoch", "best_step", "bad"):
            value = saved.get(name, 0)
            if not isinstance(value, int) or value < 0:
                problems.append(f"{name} = {value!r} (a whole number >= 0 expected)")
        if saved.get("stopped", "max_steps") not in STOPPED:
            problems.append(f"stopped = {saved.get('stopped')!r} (one of {', '.join(STOPPED)} expected)")
        if problems:
            raise InvalidInputError(f"{where} holds a training state graytune cannot continue: "
                                    + "; ".join(problems) + "; delete it to start the run over")
        calls = {**no_calls(), **(saved.get("calls") or {})}
        if "train_evaluations" not in (saved.get("calls") or {}) and calls["train"]:
            calls["train_evaluations"] = UNCOUNTED
        return cls(**{**saved, "calls": calls})


@dataclass
class FitResult:
    """What ``fit`` did.

    Attributes:
        calls: forward calls through the boundary, one per batched forward of one tower, and samples sent:
            ``train``, ``train_samples``, ``val``, ``val_samples``, and ``step`` (the calls of the last training
            step); ``train_evaluations``: training model evaluations, as ZIP and BlackVIP count calls (one
            loss on one batch, every tower included: ``train`` / 2 on a two-tower task).
        stopped: why training ended: ``max_steps``, ``patience`` or ``max_calls``.
    """

    steps: int
    best_metric: float
    best_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    step_seconds: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)
    stopped: str = "max_steps"
