"""Many clients at once, abandoned sessions, evictions, restarts and several workers: every step succeeds."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

import graytune
from graytune.serve import ApiKeys, ServeConfig, create_app
from graytune.serve.runner import BackgroundServer
from tests.serve.conftest import ALICE, BOB, KEYS

TEXTS = ["the cat sat on the mat", "a storm over the sea", "bread in the oven", "two birds on a wire"]


def _grad(handle, shift: torch.Tensor, texts=TEXTS) -> torch.Tensor:  # type: ignore[no-untyped-def]
    shift = shift.detach().clone().requires_grad_()
    z = handle.forward({"text": texts}, add={"text.token_embeds": shift})["text.embeds"]
    (z[:, :16] ** 2).sum().backward()
    return shift.grad


def test_concurrent_clients_with_abandoned_sessions(serve, minilm) -> None:
    budget_mb = 4.0  # small enough that sessions get evicted under load and clients recompute
    url, app = serve(access="dark-gray", reads=(), session_ttl_s=1.0, session_budget_mb=budget_mb,
                     client_session_mb=budget_mb)
    store = app.state.service.store
    errors: list[BaseException] = []
    peak = {"bytes": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak["bytes"] = max(peak["bytes"], store.stats()["bytes"])
            time.sleep(0.002)

    def client(index: int) -> None:
        try:
            handle = graytune.open_backbone(url, "dark-gray", api_key=ALICE if index % 2 else BOB)
            shift = torch.zeros(1, 1, 384, requires_grad=True)
            opt = torch.optim.SGD([shift], lr=0.1)
            for step in range(4):
                texts = TEXTS[: 1 + (index + step) % 4]
                z = handle.forward({"text": texts}, add={"text.token_embeds": shift})["text.embeds"]
                if index % 4 == 3:  # abandons: never differentiates, the TTL must clean up
                    continue
                opt.zero_grad()
                (z[:, :16] ** 2).sum().backward()
                opt.step()
            if index % 4 != 3:  # the boundary still gives the in-process gradient after all that
                torch.testing.assert_close(_grad(handle, shift), _grad(minilm, shift), rtol=1e-4, atol=1e-6)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    done.set()
    watcher.join()
    assert not errors, errors
    assert 0 < peak["bytes"] <= budget_mb * 2**20
    stats = store.stats()
    assert stats["evicted"] > 0  # the budget bound, and the clients recomputed without an error
    time.sleep(1.1)
    assert store.sweep() == 0 and store.stats()["bytes"] == 0


def test_an_evicted_session_is_resent_transparently(serve, minilm, caplog) -> None:
    url, app = serve(access="dark-gray", reads=(), client_sessions=1)
    remote = graytune.open_backbone(url, "dark-gray", api_key=ALICE)
    shifts = [torch.full((1, 1, 384), 0.01 * i, requires_grad=True) for i in range(2)]
    outs = [remote.forward({"text": TEXTS}, add={"text.token_embeds": s})["text.embeds"] for s in shifts]
    assert app.state.service.store.stats()["evicted"] == 1  # the second forward pushed the first out
    with caplog.at_level(logging.INFO, logger="graytune.access.remote"):
        (outs[0][:, :16] ** 2).sum().backward()
    assert "recompute" in caplog.text
    torch.testing.assert_close(shifts[0].grad, _grad(minilm, shifts[0]), rtol=1e-4, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_server_restarted_between_forward_and_vjp(minilm) -> None:
    port = _free_port()

    def server() -> BackgroundServer:
        app = create_app(minilm, ServeConfig(access="dark-gray"), ApiKeys(KEYS))
        return BackgroundServer(app, port=port)

    first = server()
    url = first.start()
    remote = graytune.open_backbone(url, "dark-gray", api_key=ALICE)
    shift = torch.full((1, 1, 384), 0.02, requires_grad=True)
    z = remote.forward({"text": TEXTS}, add={"text.token_embeds": shift})["text.embeds"]
    first.stop()
    second = server()
    threading.Timer(0.5, second.start).start()  # down while the VJP is first tried: the client retries
    try:
        (z[:, :16] ** 2).sum().backward()
    finally:
        time.sleep(0.1)
        second.stop()
    torch.testing.assert_close(shift.grad, _grad(minilm, shift), rtol=1e-4, atol=1e-6)


def test_two_uvicorn_workers_without_affinity(tmp_path, minilm, caplog) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"{name} {key}\n" for name, key in KEYS.items()))
    port = _free_port()
    cmd = [sys.executable, "-m", "graytune.cli.main", "serve", "minilm", "--api-keys", str(keys),
           "--port", str(port), "--workers", "2", "--access", "dark-gray"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        remote = graytune.open_backbone(url, "dark-gray", api_key=ALICE)
        remote._http = httpx.Client(base_url=url, headers=remote._http.headers, timeout=60,
                                    limits=httpx.Limits(max_keepalive_connections=0))  # a new connection each time
        with caplog.at_level(logging.INFO, logger="graytune.access.remote"):
            for step in range(8):
                shift = torch.full((1, 1, 384), 0.01 * step)
                torch.testing.assert_close(_grad(remote, shift), _grad(minilm, shift), rtol=1e-4, atol=1e-6)
        print(f"{caplog.text.count('recompute')} of 8 VJPs landed on the other worker and were recomputed")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait_healthy(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"graytune serve exited: {proc.stdout.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail("graytune serve did not become healthy in 120 s")
