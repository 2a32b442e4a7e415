"""Slow fault tests against ``graytune serve`` run as a process (``make test-faults``): kill -9 and restart
mid-training, 1,000 stalled connections, two workers sharing one quota, health under a saturated backbone.

Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F

import graytune
from graytune.access.wire import encode
from graytune.model import AdaptedModel
from tests.serve.conftest import ALICE, KEYS

pytestmark = pytest.mark.faults
TEXTS = ["a cat sleeps on the mat", "rain on an old tin roof", "two dogs run on the beach", "bread in a hot oven",
         "a red bicycle by the wall", "snow on the mountain top", "a cup of tea", "children play football"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``graytune serve minilm`` in a subprocess on a fixed port; ``kill()`` is kill -9."""

    def __init__(self, folder: Path, *flags: str, backbone: str = "minilm") -> None:
        self.backbone = backbone
        self.keys = folder / "keys.txt"
        self.keys.write_text("".join(f"{name} {key}\n" for name, key in KEYS.items()))
        self.port, self.flags, self.proc = _free_port(), flags, None  # type: ignore[var-annotated]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "serve.log"

    def start(self, wait: bool = True) -> Server:
        cmd = [sys.executable, "-m", "graytune.cli.main", "serve", self.backbone, "--api-keys", str(self.keys),
               "--port", str(self.port), "--access", "dark-gray", *self.flags]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout_s: float = 120) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.proc.poll() is not None:
                pytest.fail(f"graytune serve exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"graytune serve did not become healthy in {timeout_s} s")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def server(tmp_path) -> Iterator:  # type: ignore[type-arg]
    made: list[Server] = []

    def make(*flags: str, backbone: str = "minilm") -> Server:
        made.append(Server(tmp_path, *flags, backbone=backbone))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def _train(url: str, steps: int, between: dict[int, object] | None = None) -> dict[str, torch.Tensor]:
    """A DGA adapter trained for ``steps`` against the server; ``between[step]()`` runs after that step's
    forward and before its backward (the VJP)."""
    handle = graytune.open_backbone(url, "dark-gray", api_key=ALICE)  # the default retry budget: 120 s
    torch.manual_seed(0)
    model = AdaptedModel.build(handle, "dga")
    targets = F.normalize(torch.randn(len(TEXTS), 384, generator=torch.Generator().manual_seed(1)), dim=-1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        rows = [(step * 3 + i) % len(TEXTS) for i in range(4)]
        z = F.normalize(model.encode_text([TEXTS[i] for i in rows]), dim=-1)
        loss = (1 - (z * targets[rows]).sum(-1)).mean()
        if between and step in between:
            between[step]()  # type: ignore[operator]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_kill_9_between_forward_and_vjp_costs_time_not_the_training(server) -> None:
    srv = server().start()
    reference = _train(srv.url, steps=8)  # uninterrupted
    restarts: list[float] = []

    def kill_and_restart(delay_s: float) -> object:
        def now() -> None:  # the server dies holding the step's session; a supervisor restarts it after delay_s
            srv.kill()
            killed = time.monotonic()

            def restart() -> None:
                time.sleep(delay_s)
                srv.start()
                restarts.append(time.monotonic() - killed)

            threading.Thread(target=restart, daemon=True).start()

        return now

    interrupted = _train(srv.url, steps=8, between={1: kill_and_restart(0), 4: kill_and_restart(8),
                                                    6: kill_and_restart(18)})
    assert set(interrupted) == set(reference) and interrupted
    for key in reference:
        assert torch.equal(interrupted[key], reference[key]), key  # bit-identical, every time
    assert len(restarts) == 3 and max(restarts) < 30, restarts
    print("3 kill -9 mid-training, back after " + ", ".join(f"{r:.1f}" for r in restarts) + " s; adapter bit-identical")


def test_a_thousand_stalled_connections_do_not_delay_a_client(server) -> None:  # 1,100: past uvicorn's old cap
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4096)), hard))
    srv = server().start()
    host, port = "127.0.0.1", srv.port
    socks = []
    try:
        for _ in range(1100):
            sock = socket.create_connection((host, port), timeout=5)
            sock.sendall(b"POST /v1/forward HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n")  # never finished
            socks.append(sock)
        times = []
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30) as client:
            body = encode({"inputs/text.input_ids": torch.tensor([[101, 1037, 4937, 102]])})
            for _ in range(50):
                start = time.monotonic()
                assert client.post("/v1/forward", content=body).status_code == 200
                times.append(time.monotonic() - start)
    finally:
        for sock in socks:
            sock.close()
    p99 = sorted(times)[int(0.99 * len(times))]
    print(f"1,100 stalled connections: forward p50 {statistics.median(times) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    assert p99 < 1.0


@pytest.mark.parametrize("coalesce", [[], ["--coalesce-ms", "20"]], ids=["alone", "coalesced"])
def test_two_workers_give_a_key_exactly_its_quota(server, coalesce) -> None:  # type: ignore[no-untyped-def]
    srv = server("--workers", "2", "--quota-grad-rows", "10", "--quota-samples", "40", *coalesce).start()
    shift = torch.zeros(1, 1, 384)
    forward = encode({"inputs/text.input_ids": torch.tensor([[101, 1037, 4937, 102]])})
    vjp = encode({"inputs/text.input_ids": torch.tensor([[101, 1037, 4937, 102]]), "add/text.token_embeds": shift,
                  "grad/text.embeds": torch.ones(1, 384)}, {"grad": ["add/text.token_embeds"], "recompute": True})

    def post(path: str, body: bytes) -> int:
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60) as fresh:
            return fresh.post(path, content=body).status_code  # a new connection: either worker

    with ThreadPoolExecutor(8) as pool:
        vjps = list(pool.map(lambda _: post("/v1/vjp", vjp), range(30)))
        forwards = list(pool.map(lambda _: post("/v1/forward", forward), range(60)))
    print(f"two workers: {vjps.count(200)} of 30 one-row VJPs served (quota 10), "
          f"{forwards.count(200)} of 60 one-row forwards (quota 40, 10 used by the VJPs)")
    assert (vjps.count(200), vjps.count(429)) == (10, 20), vjps
    # a recompute sent without its forward pays its sample too (issue 32): 10 of the 40 went to the VJPs
    assert (forwards.count(200), forwards.count(429)) == (30, 30), forwards
    used = httpx.get(f"{srv.url}/v1/stats", headers={"Authorization": f"Bearer {ALICE}"}).json()
    assert (used["samples_used"], used["grad_rows_used"]) == (40, 10)


def test_health_spec_stats_and_release_stay_fast_with_the_backbone_saturated(server) -> None:
    srv = server().start()
    stop = time.monotonic() + 25
    body = encode({"inputs/text.input_ids": torch.randint(1000, 20000, (32, 64)),
                   "add/text.token_embeds": torch.zeros(1, 1, 384)}, {"grad": ["add/text.token_embeds"]})

    def hammer() -> int:
        done = 0
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60) as c:
            while time.monotonic() < stop:
                c.post("/v1/forward", content=body)
                done += 1
        return done

    times: dict[str, list[float]] = {}
    with ThreadPoolExecutor(12) as pool:
        load = [pool.submit(hammer) for _ in range(12)]
        time.sleep(3)
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30) as client:
            calls = {"health": lambda: client.get("/v1/health"), "spec": lambda: client.get("/v1/spec"),
                     "stats": lambda: client.get("/v1/stats"),
                     "release": lambda: client.post("/v1/sessions/release", json={"session": "x" * 43})}
            for _ in range(40):
                for route, call in calls.items():
                    start = time.monotonic()
                    assert call().status_code == 200
                    times.setdefault(route, []).append(time.monotonic() - start)
                time.sleep(0.05)
        assert sum(f.result() for f in load) > 0
    summary = {route: sorted(t)[int(0.99 * len(t))] for route, t in times.items()}
    print("p99 with the backbone saturated: " + ", ".join(f"{r} {s * 1000:.0f} ms" for r, s in summary.items()))
    assert max(summary.values()) < 0.1, summary


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _worst_text_requests() -> dict[str, tuple[str, dict]]:
    """Each at a default limit: 8,192 positions with gradients, 16,384 without, 262,144 characters."""
    ids = torch.randint(1000, 20000, (64, 128), generator=torch.Generator().manual_seed(0))
    shift, grad = torch.zeros(1, 1, 384), {"grad": ["add/text.token_embeds"]}
    return {
        "text forward with gradients": ("/v1/forward", {"content": encode(
            {"inputs/text.input_ids": ids, "add/text.token_embeds": shift}, grad)}),
        "its VJP recomputed": ("/v1/vjp", {"content": encode(
            {"inputs/text.input_ids": ids, "add/text.token_embeds": shift, "grad/text.embeds": torch.ones(64, 384)},
            {**grad, "recompute": True})}),
        "text forward without": ("/v1/forward", {"content": encode({"inputs/text.input_ids": torch.cat([ids, ids])})}),
        "tokenize": ("/v1/tokenize", {"json": {"texts": ["word " * 819] * 64}}),
    }


def _worst_image_requests() -> dict[str, tuple[str, dict]]:
    """32 images of 224 x 224 with gradients (--max-grad-pixels); 96 without (a 58 MB body, under --max-body-mb)."""
    pixels = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return {
        "image forward with gradients": ("/v1/forward", {"content": encode(
            {"inputs/image.pixels": pixels}, {"grad": ["inputs/image.pixels"], "outputs": ["image.embeds"]})}),
        "its VJP recomputed": ("/v1/vjp", {"content": encode(
            {"inputs/image.pixels": pixels, "grad/image.embeds": torch.ones(32, 384)},
            {"grad": ["inputs/image.pixels"], "outputs": ["image.embeds"], "recompute": True})}),
        "image forward without": ("/v1/forward", {"content": encode(
            {"inputs/image.pixels": pixels.repeat(3, 1, 1, 1)}, {"outputs": ["image.embeds"]})}),
    }


@pytest.mark.parametrize("backbone, worst", [("minilm", _worst_text_requests),
                                             ("bridge:efficientnet-lite0+minilm", _worst_image_requests)])
def test_the_worst_requests_the_defaults_admit_stay_within_the_memory_budget(server, backbone, worst) -> None:
    srv = server(backbone=backbone).start()
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=300) as client:
        assert client.post("/v1/tokenize", json={"texts": ["warm up"]}).status_code == 200
        warm = encode({"inputs/text.input_ids": torch.tensor([[101, 1037, 102]])}, {"outputs": ["text.embeds"]})
        assert client.post("/v1/forward", content=warm).status_code == 200
        baseline = _peak_rss_mb(srv.proc.pid)
        peaks = {}
        for what, (path, body) in worst().items():
            response = client.post(path, **body)
            assert response.status_code == 200, (what, response.text)
            peaks[what] = _peak_rss_mb(srv.proc.pid) - baseline
        refused = client.post("/v1/forward", content=encode({"inputs/text.input_ids": torch.full((10_000, 16), 1037),
                                                             "add/text.token_embeds": torch.zeros(1, 1, 384)},
                                                            {"grad": ["add/text.token_embeds"]}))
        assert refused.status_code == 413
    print(f"{backbone}: baseline peak RSS {baseline:.0f} MB; peak growth after each worst case (cumulative): "
          + ", ".join(f"{w} +{p:.0f} MB" for w, p in peaks.items()))
    assert max(peaks.values()) < 3500  # one request's work; sessions (--session-budget-mb) come on top
