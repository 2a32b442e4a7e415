"""The training process of one fine-tuning job: ``python -m graytune.recipes.jobs.child JOB_FOLDER``.

It runs what ``graytune train`` runs (``train_model``) on the job's files, against the server that started it:
the backbone is the server's URL (``$GRAYTUNE_JOB_SERVER``) and ``$GRAYTUNE_API_KEY`` a key the server made for
the client who created the job, so the job trains at that client's level, within its quotas, through the same boundary as any client, and
its run folder (``JOB/run``) resumes exactly where it stopped.

Signals and exit codes (read by ``graytune.recipes.jobs.runner``):

- ``SIGUSR1``: pause: the step under way finishes and is checkpointed; exit 75;
- ``SIGTERM``: the last whole step is checkpointed (``fit``'s handling); exit 143. A server that dies takes its
  jobs' processes with it the same way (the parent-death signal is SIGTERM);
- 0: trained; ``JOB/result.json`` holds the summary and the exposure record;
- 1: the job failed; ``JOB/error.json`` says why, in the words ``graytune train`` would use.

Only one process runs a job at a time (an exclusive lock on ``JOB/run.lock``).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from graytune.errors import GraytuneError
from graytune.recipes.jobs.files import write_json
from graytune.recipes.run import RunSpec, train_model
from graytune.runs import CONFIG_NAME
from graytune.train.config import TrainConfig
from graytune.train.loop import Paused, Terminated

__all__ = ["EXIT_FAILED", "EXIT_PAUSED", "EXIT_STOPPED", "main"]
EXIT_FAILED, EXIT_PAUSED, EXIT_STOPPED = 1, 75, 143
_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    folder = Path(argv[0])
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with (folder / "run.lock").open("w") as lock:
        _wait_for(lock)
        return _train(folder)


def _train(folder: Path) -> int:
    run = json.loads((folder / "job.json").read_text())["graytune"]["run"]
    if (folder / "run" / CONFIG_NAME).is_file() and (folder / "result.json").is_file():
        return 0  # finished before the server last stopped
    pause = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: pause.set())
    spec = RunSpec(os.environ["GRAYTUNE_JOB_SERVER"], run["access"], run["method"], None, out=str(folder / "run"),
                   train=TrainConfig(**run["train"]), options=run["options"], files=run["files"],
                   retry_s=run.get("retry_s", 60.0))
    try:
        summary, model = train_model(spec, progress=False, pause=pause)
    except Paused:
        return EXIT_PAUSED
    except Terminated:
        return EXIT_STOPPED
    except GraytuneError as err:
        write_json(folder / "error.json", {"code": type(err).__name__, "message": str(err)})
        return EXIT_FAILED
    except Exception as err:  # noqa: BLE001 - said in the job's error; the traceback goes to job.log
        logging.exception("the job's training failed")
        write_json(folder / "error.json", {"code": "internal", "message": f"training failed: {type(err).__name__}: "
                                       f"{err}"})
        return EXIT_FAILED
    summary.pop("history", None)
    exposure = model.handle.exposure.to_dict()
    write_json(folder / "result.json", {"summary": summary, "exposure": exposure, "finished_at": int(time.time())})
    return 0


def _die_with_parent() -> None:
    """SIGTERM this process when the server that started it dies (Linux), so a killed server leaves no
    orphan training on; elsewhere the lock keeps a restarted server's process waiting for it."""
    parent = int(os.environ.get("GRAYTUNE_JOB_PARENT", "0"))
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent and os.getppid() != parent:  # the server died before the signal was armed
        raise SystemExit(EXIT_STOPPED)


def _wait_for(lock: Any, timeout_s: float = 120.0) -> None:
    """Hold the job's lock, waiting for a process of the server's previous life to checkpoint and leave."""
    until = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > until:
                raise SystemExit(EXIT_STOPPED) from None
            time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
