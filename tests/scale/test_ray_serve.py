"""The same app as a Ray Serve deployment: two replicas, back-pressure, every client step succeeds."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import httpx
import pytest
import torch

import graytune
from graytune.access import RemoteHandle
from graytune.serve.config import ServeConfig

pytestmark = pytest.mark.scale
KEY = "ray-key-0123456789abcdefghij"
TEXTS = ["the cat sat on the mat", "a storm over the sea", "bread in the oven"]


def _grad(handle, shift: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    shift = shift.detach().clone().requires_grad_()
    z = handle.forward({"text": TEXTS}, add={"text.token_embeds": shift})["text.embeds"]
    (z[:, :16] ** 2).sum().backward()
    return shift.grad


@pytest.fixture(scope="module")
def ray_url(tmp_path_factory) -> str:  # type: ignore[no-untyped-def]
    import ray  # make test-scale installs graytune[ray]; a missing Ray fails here rather than skipping
    from ray import serve

    from graytune.serve.ray_app import serve_on_ray

    keys = Path(tmp_path_factory.mktemp("ray")) / "keys.txt"
    keys.write_text(f"trainer {KEY}\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    url = serve_on_ray("minilm", ServeConfig(access="dark-gray", port=port), str(keys), replicas=2, blocking=False,
                       max_ongoing=1, max_queued=1)  # tight, so that concurrent clients meet back-pressure
    yield url
    serve.shutdown()
    ray.shutdown()


def test_steps_through_two_replicas_equal_in_process(ray_url: str) -> None:
    local = graytune.open_backbone("minilm", "dark-gray")
    remote = graytune.open_backbone(ray_url, "dark-gray", api_key=KEY)
    remote._http = httpx.Client(base_url=ray_url, headers=remote._http.headers, timeout=120,
                                limits=httpx.Limits(max_keepalive_connections=0))
    for step in range(6):
        shift = torch.full((1, 1, 384), 0.01 * step)
        torch.testing.assert_close(_grad(remote, shift), _grad(local, shift), rtol=1e-4, atol=1e-6)


def test_back_pressure_is_retried_and_no_step_fails(ray_url: str, caplog: pytest.LogCaptureFixture) -> None:
    errors: list[BaseException] = []

    def client() -> None:
        try:
            remote = RemoteHandle(ray_url, graytune.AccessLevel.DARK_GRAY, api_key=KEY, retries=40)
            for step in range(3):
                _grad(remote, torch.full((1, 1, 384), 0.01 * step))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    with caplog.at_level(logging.INFO, logger="graytune.access.remote"):
        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    assert not errors, errors
    assert "busy (503)" in caplog.text  # Ray refused some requests, and the clients got through anyway
