"""Fine-tuning jobs on disk: one folder per job, its record, its events, its run.

``JOBS/jobs/<client digest>/<job id>/`` holds ``job.json`` (the record: OpenAI's job object and, under
``graytune``, the run it asks for and where it stands), ``events.jsonl`` (the messages the server wrote),
``run/`` (the run folder of ``graytune train``: ``checkpoint.pt``, ``history.jsonl``, then the adapter) and
``job.log`` (the training process's own log). Every record write is atomic; events are appended a line at
a time. Metrics events are read from the run's ``history.jsonl``, so what a client sees is what the loop
logged, step by step.

Statuses are OpenAI's eight: ``validating_files``, ``queued``, ``running``, ``pausing``, ``paused``,
``succeeded``, ``failed``, ``cancelled``.

Example:
    >>> store = JobStore(Path("jobs"))
    >>> job = store.create("alice", record)           # a new folder, status queued
    >>> store.update(job["id"], status="running")
    >>> store.events(job["id"])                       # newest first, messages and metrics
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from graytune.recipes.jobs.files import client_folder, write_json
from graytune.runs import HISTORY_NAME
from graytune.serve.admission import HTTPProblem

__all__ = ["ACTIVE", "FINISHED", "JobStore", "public"]

#: statuses of a job that still holds a place (queued, running or resumable)
ACTIVE = ("validating_files", "queued", "running", "pausing", "paused")
#: statuses of a job that will not run again
FINISHED = ("succeeded", "failed", "cancelled")


def public(record: dict[str, Any], queue_position: int | None = None) -> dict[str, Any]:
    """The job object a client sees: OpenAI's fields, and graytune's (method options, level, ``queue_position``
    from the runner's queue, exposure) under ``graytune``, without the server's paths or the run's internals."""
    out = {k: v for k, v in record.items() if k != "graytune"}
    ours = record["graytune"]
    out["graytune"] = {k: ours.get(k) for k in ("access", "method", "options", "train", "exposure", "result",
                                                "attempts")}
    out["graytune"]["queue_position"] = queue_position
    return out


class JobStore:
    """Every job's record, in memory and on disk; a client reaches only its own (another's id: 404)."""

    def __init__(self, root: Path) -> None:
        self.root = root / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._jobs: dict[str, dict[str, Any]] = {}
        for path in sorted(self.root.glob("*/ftjob-*/job.json")):
            record = json.loads(path.read_text())
            self._jobs[record["id"]] = record

    def folder(self, job_id: str) -> Path:
        return client_folder(self.root, self._jobs[job_id]["graytune"]["client"]) / job_id

    def create(self, client: str, record: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._jobs[record["id"]] = record
            folder = self.folder(record["id"])
            folder.mkdir(parents=True)
            self._write(record)
            self.note(record["id"], f"Created fine-tuning job: {record['id']}")
        return record

    def get(self, client: str | None, job_id: str) -> dict[str, Any]:
        """The job ``job_id`` of ``client`` (``None``: any client's, the owner's view); 404 otherwise."""
        record = self._jobs.get(job_id)
        if record is None or (client is not None and record["graytune"]["client"] != client):
            raise HTTPProblem(404, "not_found", f"no fine-tuning job {job_id!r} among yours; GET "
                              "/v1/fine_tuning/jobs lists them")
        return record

    def listing(self, client: str | None) -> list[dict[str, Any]]:
        """``client``'s jobs (every job for ``None``), newest first."""
        jobs = [r for r in self._jobs.values() if client is None or r["graytune"]["client"] == client]
        return sorted(jobs, key=lambda r: (r["created_at"], r["id"]), reverse=True)

    def update(self, job_id: str, **fields: Any) -> dict[str, Any]:
        """Set top-level fields (and ``graytune=`` a dict merged into graytune's part); written at once."""
        with self._lock:
            record = self._jobs[job_id]
            ours = fields.pop("graytune", None)
            record.update(fields)
            if ours:
                record["graytune"].update(ours)
            self._write(record)
            return record

    def note(self, job_id: str, message: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        """Append a message event to the job's log (what ``GET .../events`` shows)."""
        with self._lock:
            path = self.folder(job_id) / "events.jsonl"
            count = len(_lines(path))
            event = {"object": "fine_tuning.job.event", "id": f"ftevent-{job_id[6:]}-m{count:06d}",
                     "created_at": int(time.time()), "level": level, "message": message, "type": "message",
                     "data": data or {}}
            with path.open("a") as f:
                f.write(json.dumps(event) + "\n")

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's events, newest first: the server's messages and the run's metrics (each step's loss, rate
        and calls; each validation's metrics), in the order they happened."""
        folder = self.folder(job_id)
        path = folder / "events.jsonl"
        messages = [json.loads(line) for line in _lines(path)]
        metrics = _metrics_events(job_id, folder / "run" / HISTORY_NAME)
        merged = sorted(messages + metrics, key=lambda e: (e["created_at"], e["id"]))
        return merged[::-1]

    def _write(self, record: dict[str, Any]) -> None:
        write_json(self.folder(record["id"]) / "job.json", record)


def _lines(path: Path) -> list[str]:
    """The lines of a file appended a line at a time (none when it is not there yet)."""
    return path.read_text().splitlines() if path.is_file() else []


def _metrics_events(job_id: str, history: Path) -> list[dict[str, Any]]:
    """``history.jsonl``'s steps and validations as OpenAI metrics events (a line cut by a crash is skipped)."""
    if not history.is_file():
        return []
    events = []
    for number, line in enumerate(history.read_text().splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("event") not in ("step", "val"):
            continue
        data = _metrics_data(row)
        at = int(row.get("at", 0))
        message = (f"Step {row['step']}: training loss={row['loss']:.4f}" if row["event"] == "step" else
                   f"Step {row['step']}: validation {row.get('primary', 'metric')}="
                   f"{row['metrics'].get(row.get('primary', ''), float('nan')):.4f}")
        events.append({"object": "fine_tuning.job.event", "id": f"ftevent-{job_id[6:]}-h{number:06d}",
                       "created_at": at, "level": "info", "message": message, "type": "metrics", "data": data})
    return events


def _metrics_data(row: dict[str, Any]) -> dict[str, Any]:
    if row["event"] == "step":
        return {"step": row["step"], "train_loss": row["loss"], "learning_rate": row.get("lr"),
                "epoch": row.get("epoch"), "train_calls": row.get("train_calls"),
                "forward_queries": row.get("forward_queries"), "gradient_queries": row.get("gradient_queries")}
    primary = row.get("primary")
    return {"step": row["step"], **{f"valid_{k}": v for k, v in row.get("metrics", {}).items()},
            "valid_primary": primary, "best": row.get("best"), "val_calls": row.get("val_calls")}
