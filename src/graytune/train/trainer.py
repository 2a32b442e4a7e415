"""The names ``graytune.train.trainer`` has always offered, for code written against it.

The trainer now lives in rooms of its own: the loop (``graytune.train.loop``), its settings
(``.config``), its state (``.state``), where gradients come from (``.gradients``, ``.zeroth``),
the call budget (``.budget``), data-parallel arithmetic (``.distributed``), the checkpoint
(``.checkpoint``) and the run folder (``graytune.runs``).

Example:
    >>> from graytune.train.trainer import TrainConfig, fit
    >>> result = fit(model, task, val_data, TrainConfig(max_steps=100), checkpoint="out/checkpoint.pt")
"""

from __future__ import annotations

from graytune.runs import HISTORY_NAME, calls_curve
from graytune.train.budget import call_fields, counted
from graytune.train.config import LIMITS, OPTIONAL, TrainConfig, checkpoint_cadence, limit_problem
from graytune.train.distributed import world_position
from graytune.train.gradients import zeroth_order_for
from graytune.train.loop import fit, seed_everything
from graytune.train.state import CALL_KEYS, FitResult, FitState

__all__ = ["CALL_KEYS", "HISTORY_NAME", "LIMITS", "OPTIONAL", "FitResult", "FitState", "TrainConfig", "call_fields",
           "calls_curve", "checkpoint_cadence", "counted", "fit", "limit_problem", "seed_everything",
           "world_position", "zeroth_order_for"]
