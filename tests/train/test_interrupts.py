"""Work is kept when a run is stopped from outside (issue 28 item 6): SIGTERM (kill, timeout, SLURM,
Kubernetes) and a fatal error of a backbone server checkpoint the last whole step, as Ctrl-C does."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from graytune.cli.main import main
from graytune.errors import RemoteError
from graytune.train.loop import _Run
from graytune.train.tasks import RetrievalTask
from tests.data.test_catalog import write_pairs


class Killed(Exception):
    """What the process's own SIGTERM handler raises (the one in place before training)."""


@pytest.fixture
def flags(tiny_clip_dir, tmp_path) -> list[str]:  # type: ignore[no-untyped-def]
    pairs = str(write_pairs(tmp_path / "d", n=30))
    return ["train", "--backbone", f"hf-clip:{tiny_clip_dir}", "--method", "dga", "--data", pairs, "--max-steps",
            "6", "--batch-size", "4", "--lr", "0.01"]


@pytest.fixture
def own_handler():  # type: ignore[no-untyped-def]
    def handler(signum, frame):  # type: ignore[no-untyped-def]
        raise Killed

    previous = signal.signal(signal.SIGTERM, handler)
    yield handler
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_checkpoints_the_last_whole_step_and_resumes_exactly(monkeypatch, flags, own_handler, tmp_path,
                                                                      capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    original = _Run.log_step

    def log_step(self, loss, lr):  # type: ignore[no-untyped-def]
        original(self, loss, lr)
        if self.state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(_Run, "log_step", log_step)
        assert main([*flags, "--out", str(out)]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert f"stopped by SIGTERM at step 3; checkpoint saved to {out / 'checkpoint.pt'}" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is own_handler  # put back after fit
    assert main([*flags, "--out", str(out)]) == 0  # the same command resumes
    assert main([*flags, "--out", str(tmp_path / "whole")]) == 0  # never interrupted
    capsys.readouterr()
    resumed, whole = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "whole" /
                                                                             "adapter_model.safetensors")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert signal.getsignal(signal.SIGTERM) is own_handler


def test_a_fatal_server_error_checkpoints_the_last_whole_step(monkeypatch, flags, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    original, calls = RetrievalTask.loss, []

    def loss(self, model, batch):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 4:  # step 4's forward: the server's quota is spent
            raise RemoteError(429, "quota", "this key's quota of samples is spent (used 96, asked 4)")
        return original(self, model, batch)

    monkeypatch.setattr(RetrievalTask, "loss", loss)
    assert main([*flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"stopped by the backbone server's error below at step 3; checkpoint saved to {out}" in err
    assert "answered 429 (quota)" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"] == 3


def test_a_pause_finishes_the_step_saves_it_and_resumes_exactly(monkeypatch, tiny_clip_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A fine-tuning job's pause: the event set during step 3 stops the run after step 3 (its validation
    included); the same run resumed from the checkpoint ends with the uninterrupted run's adapter, bit for bit."""
    import threading

    from graytune.recipes.run import RunSpec, train_model
    from graytune.train.config import TrainConfig
    from graytune.train.loop import Paused

    pairs = str(write_pairs(tmp_path / "d", n=30))

    def spec(out: str) -> RunSpec:
        return RunSpec(f"hf-clip:{tiny_clip_dir}", None, "dga", pairs, out=out,
                       train=TrainConfig(max_steps=6, batch_size=4, lr=0.01, eval_every=3))

    pause, original = threading.Event(), _Run.log_step

    def log_step(self, loss, lr):  # type: ignore[no-untyped-def]
        original(self, loss, lr)
        if self.state.step == 3:
            pause.set()

    with monkeypatch.context() as m:
        m.setattr(_Run, "log_step", log_step)
        with pytest.raises(Paused) as paused:
            train_model(spec(str(tmp_path / "run")), progress=False, pause=pause)
    assert paused.value.step == 3
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["state"]
    assert saved["step"] == 3 and [h["step"] for h in saved["history"]] == [3]  # step 3's validation ran
    train_model(spec(str(tmp_path / "run")), progress=False, pause=threading.Event())
    train_model(spec(str(tmp_path / "whole")), progress=False)
    resumed = load_file(tmp_path / "run" / "adapter_model.safetensors")
    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
