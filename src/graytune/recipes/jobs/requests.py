"""What a client's ``POST /v1/fine_tuning/jobs`` asks for, checked and turned into the run its job will train.

OpenAI's fields keep their meaning: ``model`` (the served backbone's id), ``training_file``, ``validation_file``
(without one, 10 % of the training file is held out, as ``graytune train --train`` does), ``seed`` (random when
absent, and recorded), ``suffix``, ``metadata``, and ``hyperparameters``:

- ``n_epochs`` ("auto": 3) sets the optimizer steps: epochs x (training rows // batch size);
- ``batch_size`` ("auto": 32, or the training rows when fewer);
- ``learning_rate_multiplier`` ("auto": 1) scales the method's default learning rate (``graytune methods``);
- and graytune's own training settings by their ``TrainConfig`` names (``max_steps`` in place of ``n_epochs``,
  ``lr`` in place of the multiplier, ``warmup``, ``eval_every``, ``patience``, ``grad_accum``, ``weight_decay``,
  ``max_calls``, the zeroth-order ``zo_*``).

``method`` is ``{"type": NAME, NAME: {"options": {...}, "hyperparameters": {...}}}`` with a graytune method
(``graytune methods``); OpenAI's ``supervised`` means this server's default, ``dga`` from dark-gray up and
``dga-zo`` at black-box. The method must adapt this kind of backbone and need no more than the level the owner
lends.

Example:
    >>> run = job_run(body, service, files, "alice")     # or HTTPProblem 400/403/404
    >>> run["train"]["max_steps"], run["access"]
"""

from __future__ import annotations

import re
import secrets
from dataclasses import asdict, fields
from typing import Any

from graytune.errors import InvalidInputError
from graytune.methods import get_method
from graytune.recipes.jobs.files import FileStore
from graytune.serve.admission import HTTPProblem
from graytune.serve.service import Service
from graytune.train.config import TrainConfig
from graytune.types import AccessLevel

__all__ = ["AUTO_EPOCHS", "job_run"]
AUTO_EPOCHS, AUTO_BATCH = 3, 32
OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
#: TrainConfig fields a job may set (``seed`` is the job's own field; checkpoints are the server's business)
OWN_HYPERPARAMETERS = tuple(f.name for f in fields(TrainConfig)
                            if f.name not in ("seed", "checkpoint_every", *OPENAI_HYPERPARAMETERS))
JOB_FIELDS = ("model", "training_file", "validation_file", "hyperparameters", "method", "seed", "suffix", "metadata",
              "integrations")


def job_run(body: Any, service: Service, files: FileStore, client: str) -> dict[str, Any]:
    """The checked job: OpenAI's fields as they will be reported, and ``run`` (what the training process runs)."""
    if not isinstance(body, dict):
        raise _bad(f"send a JSON object with model and training_file; got {type(body).__name__}")
    unknown = sorted(set(body) - set(JOB_FIELDS))
    if unknown:
        raise _bad(f"unknown field(s) {unknown}; a job takes {', '.join(JOB_FIELDS)}")
    backbone = service.handle.spec.id
    if body.get("model") != backbone:
        raise _bad(f"model is {body.get('model')!r}; this server fine-tunes {backbone!r} (GET /v1/models)")
    train_file = files.get(client, _text(body, "training_file"))
    val_file = files.get(client, _text(body, "validation_file")) if body.get("validation_file") else None
    name, options, extra = _method(body.get("method"), service)
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**31)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
        raise _bad(f"seed is {seed!r}; give a whole number from 0 to 2^31 - 1")
    hyper = {**(body.get("hyperparameters") or {}), **extra}
    rows = train_file["graytune"]["rows"] if val_file else train_file["graytune"]["rows"] - \
        max(1, train_file["graytune"]["rows"] // 10)
    train, shown = _train_config(hyper, name, rows, seed)
    suffix = body.get("suffix")
    if suffix is not None and not (isinstance(suffix, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", suffix)):
        raise _bad(f"suffix is {suffix!r}; use up to 64 letters, digits, '-' or '_'")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in metadata.items())):
        raise _bad("metadata takes at most 16 string pairs (keys of up to 64 characters, values of up to 512)")
    return {"model": backbone, "training_file": train_file["id"], "validation_file": val_file and val_file["id"],
            "hyperparameters": shown, "method": {"type": name, name: {"options": options, "hyperparameters": hyper}},
            "seed": seed, "user_provided_suffix": suffix, "metadata": metadata,
            "run": {"access": get_method(name).min_access.label, "method": name, "options": options, "train": asdict(train),
                    "files": {"train": str(files.data_path(client, train_file["id"])),
                              "val": str(files.data_path(client, val_file["id"])) if val_file else None}}}


def _method(given: Any, service: Service) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The method's name, its options and the hyperparameters given inside it."""
    default = "dga" if service.granted >= AccessLevel.DARK_GRAY else "dga-zo"
    if given is None:
        return default, {}, {}
    if not isinstance(given, dict) or not isinstance(given.get("type"), str):
        raise _bad('method is {"type": NAME, NAME: {"options": {...}, "hyperparameters": {...}}}; '
                   f"got {given!r}")
    name = default if given["type"] == "supervised" else given["type"]
    inner = given.get(given["type"]) or {}
    if not isinstance(inner, dict) or set(inner) - {"options", "hyperparameters"}:
        raise _bad(f"method.{given['type']} takes options and hyperparameters; got {inner!r}")
    method = get_method(name)  # unknown: 400 naming the methods
    if method.recipe != "fit":
        raise _bad(f"method {name!r} is made by {method.trained_by}, not by a fine-tuning job; "
                   "choose a method that graytune train trains")
    method.check_backbone(service.handle.spec)
    method.check_access(service.granted)  # 403 naming the level it needs and what this server lends
    options = inner.get("options") or {}
    known = sorted({o.name for o in method.options()} | {o.qualified for o in method.options()})
    if not isinstance(options, dict) or set(options) - set(known):
        raise _bad(f"method {name!r} takes the options {known}; got {options!r}")
    return name, options, dict(inner.get("hyperparameters") or {})


def _train_config(hyper: dict[str, Any], method: str, rows: int, seed: int) -> tuple[TrainConfig, dict[str, Any]]:
    """The run's ``TrainConfig`` and OpenAI's three hyperparameters as the job object reports them."""
    unknown = sorted(set(hyper) - set(OPENAI_HYPERPARAMETERS) - set(OWN_HYPERPARAMETERS))
    if unknown:
        raise _bad(f"unknown hyperparameter(s) {unknown}; a job takes {', '.join(OPENAI_HYPERPARAMETERS)} and "
                   f"graytune's {', '.join(OWN_HYPERPARAMETERS)}")
    for ours, theirs in (("max_steps", "n_epochs"), ("lr", "learning_rate_multiplier")):
        if ours in hyper and hyper.get(theirs, "auto") != "auto":
            raise _bad(f"give {ours} or {theirs}, not both")
    batch = _auto(hyper, "batch_size", min(AUTO_BATCH, max(1, rows)), int)  # OpenAI's name is TrainConfig's
    epochs = _auto(hyper, "n_epochs", AUTO_EPOCHS, int)
    multiplier = _auto(hyper, "learning_rate_multiplier", 1.0, (int, float))
    own = {k: v for k, v in hyper.items() if k in OWN_HYPERPARAMETERS}
    default_lr = get_method(method).lr or 0.0
    own.setdefault("lr", default_lr * multiplier)
    own.setdefault("max_steps", max(1, epochs * (rows // max(1, batch * int(own.get("grad_accum", 1))))))
    try:
        config = TrainConfig(**{**own, "batch_size": batch, "seed": seed, "checkpoint_every": "10m"})
    except (InvalidInputError, TypeError) as err:
        raise _bad(f"hyperparameters refused: {err}") from None
    return config, {"n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": multiplier}


def _auto(hyper: dict[str, Any], key: str, default: Any, kind: Any) -> Any:
    value = hyper.get(key, "auto")
    if value == "auto":
        return default
    if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
        raise _bad(f"hyperparameters.{key} is {value!r}; give \"auto\" or a positive number")
    return value


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise _bad(f"{key} is {value!r}; give the id of a file you uploaded (POST /v1/files)")
    return value


def _bad(detail: str) -> HTTPProblem:
    return HTTPProblem(400, "invalid_input", detail)
