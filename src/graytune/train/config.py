"""How to train: ``TrainConfig`` (every field recorded in the artifact) and the limits each field accepts.

Bad values are refused all at once, with what each field allows.

Example:
    >>> TrainConfig(lr=3e-3, max_steps=100, batch_size=16)
    >>> TrainConfig(max_steps=0)   # InvalidInputError: training settings refused: max_steps must be >= 1; got 0
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from graytune.errors import InvalidInputError
from graytune.train.zeroth import ZO_FIELDS, settings_problems


#: What each field of ``TrainConfig`` accepts: (lowest, whether the lowest is allowed, highest or None).
LIMITS: dict[str, tuple[float, bool, float | None]] = {
    "lr": (0.0, True, None), "weight_decay": (0.0, True, None), "batch_size": (1, True, None),
    "grad_accum": (1, True, None), "max_steps": (1, True, None), "warmup": (0.0, True, 1.0),
    "eval_every": (0, True, None), "patience": (0, True, None), "seed": (0, True, None),
    "max_calls": (0, True, None), "zo_q": (1, True, None), "zo_eps": (0.0, False, None), "zo_dim": (1, True, None),
    "zo_momentum": (0.0, True, 1.0),
}
#: Fields whose None means "the default of the method (lr) or of the estimator (zo_*)".
OPTIONAL = {"lr", *ZO_FIELDS}


@dataclass
class TrainConfig:
    """How to train; every field is written into the artifact. Bad values are refused all at once."""

    lr: float | None = None
    """Peak learning rate of AdamW; None: the method's default (graytune methods lists it)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 32
    """Samples per forward; an optimizer step sees ``batch_size * grad_accum``."""
    grad_accum: int = 1
    """Forwards accumulated per optimizer step."""
    max_steps: int = 100
    """Optimizer steps in all."""
    warmup: float = 0.05
    """Fraction of ``max_steps`` with a linear warm-up (0 <= warmup < 1), then cosine decay to zero."""
    eval_every: int = 0
    """Validate every this many steps; 0 means once per epoch."""
    patience: int = 0
    """Stop after this many validations without improvement; 0 never stops early."""
    seed: int = 0
    """Seed of the data order and of every random draw."""
    checkpoint_every: str = "10m"
    """Also checkpoint every N steps (``50``) or every N minutes (``10m``); Ctrl-C checkpoints too."""
    max_calls: int = 0
    """Stop before a training step would take the forward calls through the boundary past this many
    (one batched forward = one call, as BlackVIP and ZIP count; validation calls are counted apart); 0: no limit."""
    zo: str | None = None
    """Zeroth-order estimator, for methods whose input adapters train from forward calls alone (dga-zo,
    prompt-zo): spsa, spsa-gc (BlackVIP's, the default), zip (ZIP's clipped SPSA in a low-rank intrinsic space)
    or mezo (MeZO's two-point Gaussian)."""
    zo_q: int | None = None
    """Zeroth-order: perturbation directions per step, two loss evaluations each (default 5; mezo 1)."""
    zo_eps: float | None = None
    """Zeroth-order: perturbation scale (default 0.01; mezo 0.001)."""
    zo_dim: int | None = None
    """--zo zip: dimension of the intrinsic vector projected onto the adapter tensors (default 256)."""
    zo_momentum: float | None = None
    """--zo spsa-gc: momentum of the gradient correction (default 0.9)."""

    def __post_init__(self) -> None:
        errors = [problem for name in LIMITS if (problem := limit_problem(name, getattr(self, name)))]
        if self.zo is not None or self.zo_dim is not None or self.zo_momentum is not None:
            errors += settings_problems(self.zo, self.zo_dim, self.zo_momentum)
        try:
            checkpoint_cadence(self.checkpoint_every)
        except InvalidInputError as err:
            errors.append(str(err))
        if errors:
            raise InvalidInputError("training settings refused: " + "; ".join(errors))


def checkpoint_cadence(text: str) -> tuple[int, float]:
    """``(steps, seconds)`` between checkpoints from ``"50"`` (steps) or ``"10m"``/``"30s"`` (time)."""
    value = str(text).strip().lower()
    try:
        if value.endswith(("m", "s")):
            amount = float(value[:-1])
            if amount > 0:
                return 0, amount * (60.0 if value.endswith("m") else 1.0)
        elif int(value) > 0:
            return int(value), 0.0
    except ValueError:
        pass
    raise InvalidInputError(f"checkpoint_every must be a number of steps (50) or of minutes (10m) or seconds "
                            f"(30s), above 0; got {text!r}")


def limit_problem(name: str, value: float | None) -> str:
    """Why ``value`` is not allowed for the ``TrainConfig`` field ``name`` ("" when it is)."""
    if value is None and name in OPTIONAL:
        return ""
    low, low_ok, high = LIMITS[name]
    if value is None or value < low or (value == low and not low_ok) or (high is not None and value >= high):
        allowed = (f"{'>=' if low_ok else '>'} {low:g}" + (f" and < {high:g}" if high is not None else ""))
        return f"{name} must be {allowed}; got {value}"
    return ""


def resumable(config: TrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues (the cadence and the budget may change)."""
    return {k: v for k, v in asdict(config).items() if k not in ("checkpoint_every", "max_calls")}
