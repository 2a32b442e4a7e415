"""The training checkpoint: every tensor and counter a run needs to continue exactly, written atomically.

One ``torch.save`` file (read back with ``weights_only=True``: plain data and tensors, never
pickled objects) under the keys named below; the run folder names the file
(``graytune.runs.CHECKPOINT_NAME``). A resume refuses, before any training, a checkpoint of another
method or backbone, or one written with other training settings, adapter options or data (the run's
``settings``: the data's name or files and their content hashes, the task), naming what differs.
A checkpoint written before a setting was recorded resumes: what it did not record is not checked.

Example:
    >>> save_checkpoint(path, tensors, opt, sched, state, config, source, settings={"data": "fortunes"})
    >>> state = load_checkpoint(path, model_tensors, opt, sched, config, source, settings={"data": "fortunes"})
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
"""The training settings a resume must share (``graytune.train.config.resumable``)."""
RUN = "run"
"""The rest a resume must share: the adapters' options, the data and task (plain data, by name); absent in
checkpoints written before it was recorded."""
EXPOSURE = "exposure"
"""What the run's backbone handle had counted when the checkpoint was written, less what it had counted before
the run began (``exposure_counts``): a resumed run adds it back, so its exposure record covers every process
that trained it; absent in checkpoints written before it was recorded."""
#: How a differing nested setting is named in the refusal (``options`` -> ``option dga-text.extra_tokens``).
NESTED = {"options": "option ", "data_sha256": "sha256 of "}


def exposure_counts(exposure: Any) -> dict[str, Any]:
    """The counters of an ``Exposure`` (queries, samples, tokens, black-box edits, top-k reads), as plain data."""
    data = exposure.to_dict()
    return {k: v for k, v in data.items() if isinstance(v, int) or k in ("black_box_edits", "top_k")}


def counts_between(now: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """``now - before``, counter by counter (nested dicts of counters too)."""
    return {k: counts_between(v, before.get(k, {})) if isinstance(v, dict) else v - before.get(k, 0)
            for k, v in now.items()}


def add_counts(exposure: Any, counts: dict[str, Any]) -> None:
    """Add a checkpoint's ``EXPOSURE`` counters to ``exposure`` (a resumed run's handle)."""
    for key, value in counts.items():
        if isinstance(value, int) and isinstance(getattr(exposure, key, None), int):
            setattr(exposure, key, getattr(exposure, key) + value)
        elif isinstance(value, dict) and isinstance(getattr(exposure, key, None), dict):
            _add_nested(getattr(exposure, key), value)


def _add_nested(into: dict[str, Any], counts: dict[str, Any]) -> None:
    for key, value in counts.items():
        if isinstance(value, dict):
            _add_nested(into.setdefault(key, {}), value)
        else:
            into[key] = into.get(key, 0) + value


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], opt: Any, sched: Any, state: FitState,
                    config: TrainConfig, source: GradientSource, rng: torch.Tensor | None = None,
                    settings: dict[str, Any] | None = None, exposure: dict[str, Any] | None = None) -> None:
    """Write the checkpoint atomically: a reader sees the old one or the new one, never half."""
    payload = {
        TRAINABLE: {k: v.detach().clone() for k, v in tensors.items()},
        GRADIENT_SOURCE: source.state_dict(),
        OPTIMIZER: opt.state_dict(),
        SCHEDULER: sched.state_dict(),
        RNG: torch.get_rng_state() if rng is None else rng,
        STATE: state.to_dict(),
        CONFIG: resumable(config),
        RUN: dict(settings or {}),
        EXPOSURE: dict(exposure or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path, model: torch.nn.Module, tensors: dict[str, torch.Tensor], opt: Any, sched: Any,
                    config: TrainConfig, source: GradientSource, settings: dict[str, Any] | None = None,
                    exposure: Any = None) -> FitState:
    """Put the checkpoint's tensors, optimizer, schedule, RNG and source state in place; the run's state.
    ``exposure`` (the resumed run's handle's record) gets the counts the run had made before.

    Raises:
        InvalidInputError: a damaged file, another method or backbone, or other settings, options or data.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a damaged file
        raise InvalidInputError(f"checkpoint {path} is damaged or truncated ({type(err).__name__}: "
                                f"{str(err)[:120]}); delete it to start the run over (the adapter of a finished "
                                "run is not in it)") from None
    differ = differences(payload.get(CONFIG) or {}, resumable(config))
    differ += differences(payload.get(RUN) or {}, settings or {})
    if differ:
        raise InvalidInputError(f"checkpoint {path} was written with other settings: " + ", ".join(differ)
                                + "; run with the same flags to resume, or delete the checkpoint to start over")
    if set(payload[TRAINABLE]) != set(tensors):
        raise InvalidInputError(f"checkpoint {path} belongs to another method or backbone; delete it or use "
                                "another --out")
    shapes = [f"{k} {list(v.shape)} then, {list(tensors[k].shape)} now" for k, v in payload[TRAINABLE].items()
              if v.shape != tensors[k].shape]
    if shapes:  # a checkpoint from before options were recorded, written with other --option values
        raise InvalidInputError(f"checkpoint {path} holds adapters of other shapes ({', '.join(shapes[:3])}): it was "
                                "written with other --option values; run with the same flags to resume, or delete "
                                "the checkpoint to start over")
    state = FitState.from_dict(payload[STATE], f"checkpoint {path}")
    model.load_state_dict(payload[TRAINABLE], strict=False)
    opt.load_state_dict(payload[OPTIMIZER])
    sched.load_state_dict(payload[SCHEDULER])
    torch.set_rng_state(payload[RNG])
    if payload.get(GRADIENT_SOURCE) is not None:
        source.load_state_dict(payload[GRADIENT_SOURCE])
    if exposure is not None:
        add_counts(exposure, payload.get(EXPOSURE) or {})
    return state


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"KEY THEN then, NOW now"`` for each setting recorded in ``saved`` that ``now`` changes (nested
    settings by their inner key); a setting ``saved`` does not hold was not recorded, and is not checked."""
    out = []
    for key, value in now.items():
        if key not in saved or saved[key] == value:
            continue
        then = saved[key]
        inner: list[str] = []
        if key in NESTED and isinstance(then, dict) and isinstance(value, dict):
            was, now_flat = _flat(then), _flat(value)
            inner = [f"{NESTED[key]}{k} {_shown(was[k])} then, {_shown(v)} now" for k, v in now_flat.items()
                     if k in was and was[k] != v]
        if inner or key != "data_sha256":  # hashes of other files: the data's names say what differs
            out += inner or [f"{key} {_shown(then)} then, {_shown(value)} now"]
    return out


def _flat(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _shown(value: Any) -> str:
    """A setting as the refusal shows it (a content hash shortened)."""
    text = str(value)
    return text[:12] + "…" if isinstance(value, str) and len(text) == 64 and text.isalnum() else text
