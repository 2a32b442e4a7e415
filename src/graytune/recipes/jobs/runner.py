"""Running fine-tuning jobs: a queue, ``--job-workers`` worker threads, one training process per running job.

A worker takes the oldest queued job, makes a key that acts as the job's client (``ApiKeys.grant``), and starts
``python -m graytune.recipes.jobs.child JOB`` (``graytune.recipes.jobs.child``), which trains through this very
server. Pause sends the process SIGUSR1 (it finishes its step, checkpoints, exits 75: ``paused``); cancel sends
SIGTERM (``cancelled``); resume queues the job again, and its process continues from the checkpoint. On a clean
shutdown the processes checkpoint and stop; after a crash (kill -9) they get SIGTERM from the kernel and do the
same. Either way the next start finds the jobs that were ``running`` or ``queued`` and queues them again, and a
finished job's model is hosted again. A process that dies by a signal nobody sent is restarted from its
checkpoint, at most ``RESTARTS`` times.

Example:
    >>> runner = JobRunner(store, keys, host, config, "minilm")
    >>> runner.start("http://127.0.0.1:8470")      # recovers, then serves the queue
    >>> runner.submit(job_id)
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from graytune.recipes.jobs.child import EXIT_FAILED, EXIT_PAUSED
from graytune.recipes.jobs.store import JobStore
from graytune.serve.adapters import AdapterHost
from graytune.serve.admission import HTTPProblem
from graytune.serve.config import ApiKeys, ServeConfig

__all__ = ["RESTARTS", "JobRunner"]
log = logging.getLogger(__name__)
#: restarts of a job whose process died by a signal the server did not send, before it fails
RESTARTS = 2


class JobRunner:
    """The job queue, its workers and their training processes."""

    def __init__(self, store: JobStore, keys: ApiKeys, host: AdapterHost, config: ServeConfig) -> None:
        self.store, self.keys, self.host, self.config = store, keys, host, config
        self.url = ""
        self._queue: list[str] = []
        self._wake = threading.Condition()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._wanted: dict[str, str] = {}  # job id -> "pause" or "cancel", asked while it runs
        self._closing = False
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"graytune-job-worker-{i}")
                         for i in range(max(1, config.job_workers))]

    # ---- life ----------------------------------------------------------------------------------------

    def start(self, url: str) -> None:
        """Serve the queue, the jobs' processes training through ``url`` (this server); first, recover."""
        self.url = url.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")
        self.recover()
        for thread in self._threads:
            thread.start()

    def recover(self) -> None:
        """Host every finished job's model again; queue again what was queued, running or pausing."""
        for record in reversed(self.store.listing(None)):  # oldest first: the queue keeps its order
            status, job_id = record["status"], record["id"]
            if status == "succeeded" and record.get("fine_tuned_model"):
                self._host(record)
            elif status in ("queued", "running", "validating_files"):
                if status == "running":
                    self.store.note(job_id, "The server restarted; the job resumes from its last checkpoint")
                self.store.update(job_id, status="queued")
                self._queue.append(job_id)
            elif status == "pausing":  # its process checkpointed when the server stopped
                self.store.update(job_id, status="paused")

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop taking jobs; running processes checkpoint their last whole step and stop (resumed at restart)."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        for proc in list(self._procs.values()):
            _signal(proc, signal.SIGTERM)
        until = time.monotonic() + timeout_s
        for proc in list(self._procs.values()):
            try:
                proc.wait(max(0.0, until - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()

    # ---- what clients ask ----------------------------------------------------------------------------

    def check_room(self) -> None:
        """429 when ``--job-queue`` jobs already wait (asked before a job is created, so none is left half made)."""
        if len(self._queue) >= self.config.job_queue:
            raise HTTPProblem(429, "queue_full", f"{len(self._queue)} jobs already wait (--job-queue "
                              f"{self.config.job_queue}); try again when one has started")

    def submit(self, job_id: str) -> None:
        with self._wake:
            self.check_room()
            self._queue.append(job_id)
            self.store.update(job_id, status="queued")
            self._wake.notify()

    def pause(self, job_id: str) -> None:
        with self._wake:
            status = self.store.get(None, job_id)["status"]
            if status == "queued":
                self._queue.remove(job_id)
                self.store.update(job_id, status="paused")
                self.store.note(job_id, "Paused before it started")
            elif status == "running":
                self._wanted[job_id] = "pause"
                self.store.update(job_id, status="pausing")
                _signal(self._procs.get(job_id), signal.SIGUSR1)
            else:
                raise _cannot("pause", job_id, status, "a queued or running job")

    def resume(self, job_id: str) -> None:
        status = self.store.get(None, job_id)["status"]
        if status != "paused":
            raise _cannot("resume", job_id, status, "a paused job")
        self.store.note(job_id, "Resumed; it continues from its checkpoint")
        self.submit(job_id)

    def cancel(self, job_id: str) -> None:
        with self._wake:
            status = self.store.get(None, job_id)["status"]
            if status in ("queued", "paused", "validating_files"):
                if job_id in self._queue:
                    self._queue.remove(job_id)
                self._finish(job_id, "cancelled", "Cancelled")
            elif status in ("running", "pausing"):
                self._wanted[job_id] = "cancel"
                _signal(self._procs.get(job_id), signal.SIGTERM)
            else:
                raise _cannot("cancel", job_id, status, "a job that has not finished")

    # ---- the workers ---------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                job_id = self._queue.pop(0)
                self.store.update(job_id, status="running")
                self._wanted.pop(job_id, None)
            try:
                self._run(job_id)
            except Exception:  # noqa: BLE001 - one job's failure never stops the worker
                log.exception("fine-tuning job %s failed in the server", job_id)
                self._finish(job_id, "failed", "The server failed while running the job", error={
                    "code": "internal", "message": "the server failed while running this job; the owner's log "
                    "has the cause", "param": None})

    def _run(self, job_id: str) -> None:
        record, folder = self.store.get(None, job_id), self.store.folder(job_id)
        key = secrets.token_urlsafe(32)
        self.keys.grant(record["graytune"]["client"], key)
        self.store.note(job_id, "Fine-tuning job started")
        env = {**os.environ, "GRAYTUNE_API_KEY": key, "GRAYTUNE_JOB_PARENT": str(os.getpid()),
               "GRAYTUNE_JOB_SERVER": self.url}
        try:
            with (folder / "job.log").open("ab") as logfile:
                proc = subprocess.Popen([sys.executable, "-m", "graytune.recipes.jobs.child", str(folder)],
                                        env=env, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                self._procs[job_id] = proc
                if self._wanted.get(job_id):  # paused or cancelled while it was being started
                    _signal(proc, signal.SIGUSR1 if self._wanted[job_id] == "pause" else signal.SIGTERM)
                code = proc.wait()
        finally:
            self._procs.pop(job_id, None)
            self.keys.revoke(key)
        self._ended(job_id, code)

    def _ended(self, job_id: str, code: int) -> None:
        """Where a job stands once its process exited with ``code``."""
        folder, wanted = self.store.folder(job_id), self._wanted.pop(job_id, None)
        if self._closing and not wanted:
            return  # checkpointed; the next start queues it again
        if code == 0:
            self._succeeded(job_id, json.loads((folder / "result.json").read_text()))
        elif wanted == "cancel":
            self._finish(job_id, "cancelled", "Cancelled; its last checkpoint is discarded with the job")
        elif code == EXIT_FAILED:
            error = json.loads((folder / "error.json").read_text()) if (folder / "error.json").is_file() else {
                "code": "internal", "message": "the training process failed before it could say why; the job's "
                "job.log on the server has its traceback"}
            self._finish(job_id, "failed", f"The job failed: {error['message']}",
                         error={"code": error["code"], "message": error["message"], "param": None})
        elif wanted == "pause" or code == EXIT_PAUSED:  # a pause that came before the process listened for it
            step = _checkpoint_step(folder)  # stopped it outright: it resumes from its last checkpoint (or the start)
            self.store.update(job_id, status="paused")
            self.store.note(job_id, f"Paused after step {step or 0}; resume continues from there",
                            data={"step": step or 0})
        else:
            self._restart(job_id, code)

    def _restart(self, job_id: str, code: int) -> None:
        attempts = self.store.get(None, job_id)["graytune"].get("attempts", 0) + 1
        self.store.update(job_id, graytune={"attempts": attempts})
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        if attempts > RESTARTS:
            self._finish(job_id, "failed", f"The training process stopped ({how}) {attempts} times", error={
                "code": "stopped", "message": f"the training process stopped ({how}) {attempts} times; the owner's "
                "log and the job's job.log say why", "param": None})
            return
        self.store.note(job_id, f"The training process stopped ({how}); it restarts from its last checkpoint")
        with self._wake:
            self._queue.insert(0, job_id)
            self.store.update(job_id, status="queued")
            self._wake.notify()

    def _succeeded(self, job_id: str, result: dict[str, Any]) -> None:
        record = self.store.get(None, job_id)
        ours = record["graytune"]
        model = f"ft:{record['model']}:{ours['method']}:{ours['client']}:{job_id[len('ftjob-'):]}"
        if record.get("user_provided_suffix"):
            model += f":{record['user_provided_suffix']}"
        summary = result["summary"]
        exposure = {**result["exposure"], "calls": summary.get("calls")}
        self.store.update(job_id, fine_tuned_model=model, trained_tokens=None, graytune={
            "exposure": exposure, "result": {k: summary.get(k) for k in (
                "best_val", "best_step", "steps", "stopped", "trainable_parameters", "train_seconds", "split_sizes")}})
        self._host(self.store.get(None, job_id))
        self._finish(job_id, "succeeded", f"The job has successfully completed; model {model}")

    def _host(self, record: dict[str, Any]) -> None:
        self.host.add(record["fine_tuned_model"], str(self.store.folder(record["id"]) / "run"),
                      owner=record["graytune"]["client"])

    def _finish(self, job_id: str, status: str, message: str, error: dict[str, Any] | None = None) -> None:
        self.store.update(job_id, status=status, finished_at=int(time.time()), error=error)
        self.store.note(job_id, message, level="error" if status == "failed" else "info")

    def position(self, job_id: str) -> int | None:
        """The job's place in the queue (1: next to run), or None when it is not waiting."""
        queue = list(self._queue)  # a copy: workers take from it on their threads
        return queue.index(job_id) + 1 if job_id in queue else None


def _signal(proc: subprocess.Popen[bytes] | None, signum: int) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signum)


def _checkpoint_step(folder: Path) -> int | None:
    import torch

    path = folder / "run" / "checkpoint.pt"
    return int(torch.load(path, weights_only=True)["state"]["step"]) if path.is_file() else None


def _cannot(what: str, job_id: str, status: str, allowed: str) -> HTTPProblem:
    return HTTPProblem(409, "conflict", f"job {job_id} is {status}; only {allowed} can {what}")
