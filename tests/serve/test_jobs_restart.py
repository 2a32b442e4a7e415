"""``graytune serve --jobs`` killed with kill -9 while a job trains: the job's training process checkpoints and
stops with it, and the server started again on the same folder finishes the job (issue 29's "done means")."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

import httpx  # noqa: E402
import torch  # noqa: E402

import graytune  # noqa: E402
from graytune.artifacts import load_adapter  # noqa: E402
from graytune.recipes.jobs.files import client_folder  # noqa: E402
from tests.serve.conftest import ALICE, KEYS  # noqa: E402
from tests.serve.test_jobs import QUERIES, ROWS, rows_csv, steps, wait  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
BANNER = re.compile(r"graytune serve: .* on (http://\S+) ")


def serve(folder: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``graytune serve minilm --jobs`` on a free port, and its URL once it answers."""
    cmd = [sys.executable, "-m", "graytune.cli.main", "serve", "minilm", "--api-keys", str(folder / "keys.txt"),
           "--access", "dark-gray", "--jobs", str(folder / "jobs"), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    start = time.monotonic()
    while time.monotonic() - start < 180:
        found = BANNER.search(log.read_text())
        if proc.poll() is not None:
            pytest.fail(f"graytune serve exited ({proc.returncode}): {log.read_text()[-3000:]}")
        if found:
            try:
                if httpx.get(found.group(1) + "/v1/health", timeout=2).status_code == 200:
                    return proc, found.group(1)
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"graytune serve did not answer in 180 s: {log.read_text()[-3000:]}")


def training_processes(job_folder: Path) -> list[int]:
    """Pids of the live (not zombie) training processes of the job in ``job_folder``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"graytune.recipes.jobs.child" in argv and str(job_folder).encode() in argv and state != "Z":
            found.append(int(entry.name))
    return found


def test_a_job_survives_kill_9_of_its_server_and_finishes_after_a_restart(tmp_path: Path) -> None:
    (tmp_path / "keys.txt").write_text("".join(f"{name} {key}\n" for name, key in KEYS.items()))
    server, url = serve(tmp_path, tmp_path / "serve-1.log")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=ALICE, max_retries=0, timeout=120)
        upload = client.files.create(file=("topics.csv", rows_csv(ROWS)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="minilm", training_file=upload.id, seed=2,
                                             hyperparameters={"max_steps": 24, "batch_size": 4, "eval_every": 5})
        folder = client_folder(tmp_path / "jobs" / "jobs", "alice") / job.id
        start = time.monotonic()
        while len(steps(client, job.id)) < 3:
            assert client.fine_tuning.jobs.retrieve(job.id).status in ("queued", "running")
            assert time.monotonic() - start < 240, "the job logged no 3 steps in 240 s"
            time.sleep(0.2)
        trainers = training_processes(folder)
        assert len(trainers) == 1
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()

    start = time.monotonic()
    while training_processes(folder):  # it got SIGTERM from the kernel: it checkpoints and stops
        assert time.monotonic() - start < 60, f"the training process outlived its server: {trainers}"
        time.sleep(0.2)
    assert (folder / "run" / "checkpoint.pt").is_file(), (folder / "job.log").read_text()[-3000:]
    before = torch.load(folder / "run" / "checkpoint.pt", weights_only=True)["state"]["step"]
    assert 3 <= before < 24
    assert not (folder / "run" / "adapter_model.safetensors").exists()

    server, url = serve(tmp_path, tmp_path / "serve-2.log")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=ALICE, max_retries=0, timeout=120)
        done = wait(client, job.id, timeout_s=400)
        assert done.status == "succeeded", [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200)]
        said = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200)]
        assert "The server restarted; the job resumes from its last checkpoint" in said
        assert done.graytune["result"]["steps"] == 24 and done.graytune["exposure"]["gradient_queries"] > 0
        logged = [s["step"] for s in steps(client, job.id)]
        assert logged == list(range(1, 25)), logged  # each step once: none lost, none trained twice
        answer = client.embeddings.create(model=done.fine_tuned_model, input=QUERIES)
        served = torch.tensor([d.embedding for d in answer.data])
    finally:
        server.terminate()
        server.wait(timeout=60)
    handle = graytune.open_backbone("minilm", "dark-gray")
    with torch.no_grad():
        local = load_adapter(str(folder / "run"), handle).eval().encode_text(QUERIES)
    torch.testing.assert_close(served, local, rtol=1e-5, atol=1e-5)
    assert not training_processes(folder)
