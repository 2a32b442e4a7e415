"""The run folder: what a run writes in its ``--out``, what graytune may overwrite there, and how it is read.

A run folder holds the artifact (``adapter_config.json`` + ``adapter_model.safetensors``) once
the run ends, and while it runs: ``checkpoint.pt`` (``CHECKPOINT_NAME``), ``history.jsonl``
(``HISTORY_NAME``, one JSON object per step and per validation, after a first line recording the run:
``{"event": "run", "graytune": VERSION, ...}``, by which graytune knows the file as its own; a new run
starts it afresh, a resumed one cuts it back to the checkpoint's step), TensorBoard events in
``tensorboard/`` when asked, and ``rank<r>.safetensors`` from data-parallel runs. Every other
module asks this one for those names, writes history through a ``RunLogger`` and reads it with
``read_history_lines`` (curves: ``graytune.eval.plots.read_history``; accuracy against calls:
``calls_curve``).

Example:
    >>> prepare_out("runs/dga")                     # 'new', 'resume' or 'replace'; refuses a folder it could harm
    >>> logger = open_logger("runs/dga", tensorboard=False)
    >>> logger.log({"event": "step", "step": 1, "loss": 0.7}); logger.close()
    >>> calls_curve("runs/dga-zo")                  # [(120, 0.62), (240, 0.66), ...]
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

from graytune.artifact_files import CONFIG_NAME, WEIGHTS_NAME, library_version, replace_atomically
from graytune.errors import ArtifactError, InvalidInputError, MissingDependencyError

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.jsonl"
TENSORBOARD_DIR = "tensorboard"
#: Files a graytune run or artifact folder may hold (``--out`` may replace these, never anything else).
RUN_FILES = (CONFIG_NAME, WEIGHTS_NAME, CHECKPOINT_NAME, HISTORY_NAME, "events.out.tfevents.*", "rank*.safetensors",
             TENSORBOARD_DIR)


def rank_weights_name(rank: int) -> str:
    """The file a data-parallel rank leaves its adapter in, beside the artifact."""
    return f"rank{rank}.safetensors"


def checkpoint_path(out: str | os.PathLike[str] | None) -> Path | None:
    """Where a run writing to ``out`` keeps its checkpoint (None without ``out``)."""
    return Path(out) / CHECKPOINT_NAME if out else None


def prepare_out(folder: str | os.PathLike[str], overwrite: bool = False) -> str:
    """Check a run's ``--out`` folder before any work; returns ``new``, ``resume`` or ``replace``.

    - a missing or empty folder: ``new``;
    - a folder holding an interrupted run (``checkpoint.pt``, no finished adapter): ``resume``;
    - a folder holding a finished adapter: refused unless ``overwrite`` (then ``replace``: graytune's
      own run files there are removed, nothing else);
    - a folder holding other files: refused unless ``overwrite`` (then the run's files go beside them).

    Raises:
        InvalidInputError: what the folder holds and what to do.
    """
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"--out {folder} is a file; give a folder for the adapter")
    check_history(path / HISTORY_NAME)
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    ours = [n for n in entries if any(fnmatch.fnmatch(n, pat) for pat in RUN_FILES) or n.startswith(".")]
    others = [n for n in entries if n not in ours]
    if (path / CONFIG_NAME).is_file():
        if not overwrite:
            method = _method_of(path)
            raise InvalidInputError(f"--out {folder} already holds a finished {method} adapter; pass --overwrite to "
                                    "replace it (only graytune's run files there are replaced), or choose another --out")
        for name in (CHECKPOINT_NAME, HISTORY_NAME):  # the finished run's own; a new one starts
            (path / name).unlink(missing_ok=True)
        return "replace"
    if others and not overwrite:
        shown = ", ".join(others[:3]) + (" …" if len(others) > 3 else "")
        raise InvalidInputError(f"--out {folder} holds {len(others)} file(s) that are not a graytune run ({shown}); "
                                "graytune never deletes them: choose a new or empty folder, or pass --overwrite to "
                                "write the adapter beside them")
    return "resume" if (path / CHECKPOINT_NAME).is_file() else "new"


def _method_of(path: Path) -> str:
    try:
        return repr(json.loads((path / CONFIG_NAME).read_text()).get("method"))
    except (OSError, ValueError, AttributeError):
        return "(unreadable)"


# ---- writing history ---------------------------------------------------------------------------------

class RunLogger(Protocol):
    """Where a run's step and validation records go (``history.jsonl``, TensorBoard, or nowhere)."""

    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


#: The first line's event: the record of the run that wrote the history (how graytune knows its own file).
RUN_EVENT = "run"
#: The events of histories written before the first line was (graytune 0.1 without it): theirs only.
OLD_EVENTS = ("step", "val")


def history_writer(path: Path) -> str | None:
    """Who wrote the history at ``path``: ``graytune`` (its first line records the run), ``earlier graytune``
    (no such line, but every line is a step or validation record), None: not graytune (or no file).

    An unfinished last line (a run stopped mid-write) is not held against the file.
    """
    try:
        lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    except (OSError, UnicodeDecodeError):
        return None
    records = _records(lines)
    if not records:
        return None
    if records[0].get("event") == RUN_EVENT and "graytune" in records[0]:
        return "graytune"
    complete = records if len(records) >= len(lines) - 1 else []
    if complete and all(r.get("event") in OLD_EVENTS and isinstance(r.get("step"), int) for r in complete):
        return "earlier graytune"
    return None


def _records(lines: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of ``lines``, stopping at the first line that is not one."""
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(record, dict):
            break
        out.append(record)
    return out


def check_history(path: Path) -> None:
    """Refuse a ``history.jsonl`` graytune did not write: it is never touched, with ``--overwrite`` either.

    Raises:
        InvalidInputError: the file is there and is not graytune's.
    """
    if path.exists() and history_writer(path) is None:
        raise InvalidInputError(f"{path} was not written by graytune (its first line is no graytune run record); "
                                f"graytune never touches it, with --overwrite either: move it away or choose another "
                                "--out")


class JsonlLogger:
    """``history.jsonl``: a first line recording the run, then one JSON object per record, appended.

    A new run (``resume_step`` None) starts the file afresh; a resumed one keeps its lines up to the
    checkpoint's step (the steps after it are trained again) and notes the resume. Both rewrite the file
    atomically, and refuse one that graytune did not write (``check_history``). A history written by an
    earlier graytune (no first line) is kept the same way, the run record put first.
    """

    def __init__(self, path: Path, resume_step: int | None = None, about: dict[str, Any] | None = None) -> None:
        self.path = path
        check_history(path)
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        head = {"event": RUN_EVENT, "graytune": library_version(), "started": now, **(about or {})}
        kept: list[dict[str, Any]] = []
        if resume_step is not None and path.exists():
            old = _records([line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()])
            if old and old[0].get("event") == RUN_EVENT:
                head, old = old[0], old[1:]
            kept = [r for r in old if not isinstance(r.get("step"), int) or r["step"] <= resume_step]
            kept.append({"event": "resume", "step": resume_step, "time": now})
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in (head, *kept))
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` with the wall-clock time it was logged (``at``, Unix seconds)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**record, "at": round(time.time(), 3)}, sort_keys=True) + "\n")

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """TensorBoard events in ``folder/tensorboard``: training scalars by step, validation metrics by step
    and by training calls (needs the tensorboard package)."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MissingDependencyError("--log tensorboard needs the tensorboard package: "
                                         "pip install 'graytune[tensorboard]'") from None
        self.board = SummaryWriter(str(folder / TENSORBOARD_DIR))

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if record["event"] == "step":
            for key in ("loss", "lr", "samples_per_s", "forward_queries", "gradient_queries", "train_calls",
                        "train_evaluations"):
                self.board.add_scalar(f"train/{key}", record[key], step)
        else:
            for key, value in record["metrics"].items():
                self.board.add_scalar(f"val/{key}", value, step)
                self.board.add_scalar(f"val_by_train_calls/{key}", value, record["train_calls"])
                self.board.add_scalar(f"val_by_train_evaluations/{key}", value, record["train_evaluations"])

    def close(self) -> None:
        self.board.close()


class Loggers:
    """Several loggers as one (none: records go nowhere)."""

    def __init__(self, *loggers: RunLogger) -> None:
        self.loggers = loggers

    def log(self, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def open_logger(folder: str | os.PathLike[str] | None, tensorboard: bool = False, resume_step: int | None = None,
                about: dict[str, Any] | None = None) -> RunLogger:
    """The run's history in ``folder`` (``history.jsonl``, and TensorBoard events when asked); None: nowhere.

    ``resume_step``: the step a resumed run continues from (its history is cut back to it; None: a new run,
    whose history starts afresh); ``about``: what the history's first line records of the run.
    """
    if folder is None:
        return Loggers()
    path = Path(folder)
    return Loggers(JsonlLogger(path / HISTORY_NAME, resume_step, about),
                   *([TensorBoardLogger(path)] if tensorboard else []))


# ---- reading history ---------------------------------------------------------------------------------

def history_file(run: str | os.PathLike[str]) -> Path:
    """A run's ``history.jsonl`` from its folder or the file itself.

    Raises:
        ArtifactError: the path does not exist, or the folder has no history.
    """
    path = Path(run)
    file = path if path.is_file() else path / HISTORY_NAME
    if not path.exists():
        raise ArtifactError(f"{path} does not exist; give a run folder written by graytune train --out DIR")
    if not file.is_file():
        raise ArtifactError(f"{file.parent} has no {HISTORY_NAME}; graytune train --out DIR writes it into DIR "
                            "while it trains (runs made before history was recorded have none)")
    return file


def read_history_lines(run: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a run's ``history.jsonl`` (folder or file), in order; an unfinished last line is skipped.

    Raises:
        ArtifactError: no history, or a damaged line before the last.
    """
    file = history_file(run)
    lines = file.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):  # no trailing newline: the run was stopped mid-write
                log.warning("%s: ignoring the unfinished last line %d", file, number)
                continue
            raise ArtifactError(f"{file}, line {number}: not JSON ({err.msg}); each line must be one JSON "
                                "object as graytune train writes them") from None
    return records


#: What ``calls_curve`` may count training calls in: per tower forward (what the boundary meters), or per model
#: evaluation (ZIP's and BlackVIP's API calls), by the history field each reads.
CALL_COUNTS = {"tower": "train_calls", "evaluation": "train_evaluations"}


def calls_curve(history: str | os.PathLike[str] | list[dict[str, Any]], metric: str | None = None,
                per: str = "tower") -> list[tuple[int, float]]:
    """``(training calls, validation metric)`` at each validation of a run: an accuracy-vs-calls curve.

    Args:
        history: a run's ``history.jsonl`` (in its ``--out``), its folder, or the lines already read.
        metric: a validation metric (default: the task's primary one, e.g. ``accuracy``).
        per: ``tower``: calls as the boundary counts them (one per batched forward of one tower);
            ``evaluation``: as ZIP and BlackVIP count them (one per model evaluation, every tower included;
            histories written before graytune counted them have none, and give an empty curve).

    Example:
        >>> calls_curve("runs/dga-zo")                     # [(120, 0.62), (240, 0.66), ...]
        >>> calls_curve("runs/dga-zo", per="evaluation")   # [(60, 0.62), (120, 0.66), ...]
    """
    if per not in CALL_COUNTS:
        raise InvalidInputError(f"per must be one of {', '.join(CALL_COUNTS)}; got {per!r}")
    key = CALL_COUNTS[per]
    records = history if isinstance(history, list) else read_history_lines(history)
    rows = [r for r in records if isinstance(r, dict) and r.get("event") == "val"]
    return [(int(r[key]), float(r["metrics"][metric or r["primary"]])) for r in rows if key in r]
