"""The training checkpoint: every tensor and counter a run needs to continue exactly, written atomically.

One ``torch.save`` file (read back with ``weights_only=True``: plain data and tensors, never
pickled objects) under the keys named below; the run folder names the file
(``graytune.runs.CHECKPOINT_NAME``). A resume refuses a checkpoint of another method or backbone,
or one written with other training settings, naming what differs.

Example:
    >>> save_checkpoint(path, tensors, opt, sched, state, config, source)
    >>> state = load_checkpoint(path, model_tensors, opt, sched, config, source)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from graytune.artifact_files import replace_atomically
from graytune.errors import InvalidInputError
from graytune.train.config import TrainConfig, resumable
from graytune.train.gradients import GradientSource
from graytune.train.state import FitState

TRAINABLE = "trainable"
"""The tunable tensors by name (the model's trainable ones and a gradient source's own)."""
GRADIENT_SOURCE = "zeroth_order"
"""The gradient source's own state (the zeroth-order estimator's momentum and intrinsic vector), or None."""
OPTIMIZER = "optimizer"
SCHEDULER = "scheduler"
RNG = "rng"
"""torch's CPU random state as of the last whole step."""
STATE = "state"
"""``FitState.to_dict()``."""
CONFIG = "config"
"""The settings a resume must share (``graytune.train.config.resumable``)."""


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], opt: Any, sched: Any, state: FitState,
                    config: TrainConfig, source: GradientSource, rng: torch.Tensor | None = None) -> None:
    """Write the checkpoint atomically: a reader sees the old one or the new one, never half."""
    payload = {
        TRAINABLE: {k: v.detach().clone() for k, v in tensors.items()},
        GRADIENT_SOURCE: source.state_dict(),
        OPTIMIZER: opt.state_dict(),
        SCHEDULER: sched.state_dict(),
        RNG: torch.get_rng_state() if rng is None else rng,
        STATE: state.to_dict(),
        CONFIG: resumable(config),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path, model: torch.nn.Module, tensors: dict[str, torch.Tensor], opt: Any, sched: Any,
                    config: TrainConfig, source: GradientSource) -> FitState:
    """Put the checkpoint's tensors, optimizer, schedule, RNG and source state in place; the run's state.

    Raises:
        InvalidInputError: a damaged file, another method or backbone, or other settings.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a damaged file
        raise InvalidInputError(f"checkpoint {path} is damaged or truncated ({type(err).__name__}: "
                                f"{str(err)[:120]}); delete it to start the run over (the adapter of a finished "
                                "run is not in it)") from None
    if set(payload[TRAINABLE]) != set(tensors):
        raise InvalidInputError(f"checkpoint {path} belongs to another method or backbone; delete it or use "
                                "another --out")
    saved = payload.get(CONFIG)
    if saved is not None and saved != resumable(config):
        diff = {k: (saved.get(k), v) for k, v in resumable(config).items() if saved.get(k) != v}
        raise InvalidInputError(f"checkpoint {path} was written with other settings: "
                                + ", ".join(f"{k} {a} then, {b} now" for k, (a, b) in diff.items())
                                + "; run with the same flags to resume, or delete the checkpoint to start over")
    state = FitState.from_dict(payload[STATE], f"checkpoint {path}")
    model.load_state_dict(payload[TRAINABLE], strict=False)
    opt.load_state_dict(payload[OPTIMIZER])
    sched.load_state_dict(payload[SCHEDULER])
    torch.set_rng_state(payload[RNG])
    if payload.get(GRADIENT_SOURCE) is not None:
        source.load_state_dict(payload[GRADIENT_SOURCE])
    return state
