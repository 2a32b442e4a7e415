"""Slow fault tests of ``graytune serve`` under concurrency (``make test-faults``, issue 32 item 4): eight
concurrent worst-case gradient requests stay within the documented memory bound and return their memory, and
thousands of stalled connections from many loopback addresses leave an authenticated client served.

Loopback only; every loop is bounded in count and time. docs/reliability.md gives the figures these print.
"""

from __future__ import annotations

import resource
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from graytune.access.wire import encode
from tests.serve.conftest import ALICE
from tests.serve.test_faults import _peak_rss_mb, server  # noqa: F401 - the fixture

pytestmark = pytest.mark.faults
#: the most one admitted request may add to the peak (the worst MiniLM request at the defaults measured +1,185 MB
#: alone, docs/reliability.md §1), with room for the bodies and the tokenizer: sessions are not kept here (each
#: graph is over --client-session-mb), so this is the whole bound above the baseline
ONE_REQUEST_MB = 1600
#: what an idle server may keep above its baseline once its memory is returned
IDLE_MB = 400


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _worst_gradient_requests() -> list[tuple[str, bytes]]:
    """Four forwards with gradients and four recomputed VJPs at --max-grad-tokens (64 rows x 128 tokens)."""
    ids = torch.randint(1000, 20000, (64, 128), generator=torch.Generator().manual_seed(0))
    shift, grad = torch.zeros(1, 1, 384), {"grad": ["add/text.token_embeds"]}
    forward = encode({"inputs/text.input_ids": ids, "add/text.token_embeds": shift}, grad)
    vjp = encode({"inputs/text.input_ids": ids, "add/text.token_embeds": shift, "grad/text.embeds": torch.ones(64, 384)},
                 {**grad, "recompute": True})
    return [("/v1/forward", forward), ("/v1/vjp", vjp)] * 4


def test_eight_concurrent_worst_case_gradient_requests_stay_within_the_memory_bound(server) -> None:  # noqa: F811
    srv = server("--request-timeout-s", "600").start()  # all eight run, however slow the machine
    headers = {"Authorization": f"Bearer {ALICE}"}
    warm = encode({"inputs/text.input_ids": torch.tensor([[101, 1037, 102]])})
    assert httpx.post(f"{srv.url}/v1/forward", content=warm, headers=headers, timeout=60).status_code == 200
    baseline = _peak_rss_mb(srv.proc.pid)

    def post(request: tuple[str, bytes]) -> int:
        return httpx.post(srv.url + request[0], content=request[1], headers=headers, timeout=900).status_code

    peaks, idles = [], []
    for _ in range(2):
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(post, _worst_gradient_requests()))
        assert codes == [200] * 8, codes
        peaks.append(_peak_rss_mb(srv.proc.pid))
        deadline = time.monotonic() + 15  # memory goes back on the sweep timer (at most 5 s) once idle
        while _rss_mb(srv.proc.pid) - baseline > IDLE_MB and time.monotonic() < deadline:
            time.sleep(0.5)
        idles.append(_rss_mb(srv.proc.pid))
    print(f"8 concurrent worst-case gradient requests, 2 rounds: baseline {baseline:.0f} MB, peak "
          + ", ".join(f"{p:.0f}" for p in peaks) + " MB, idle " + ", ".join(f"{i:.0f}" for i in idles) + " MB")
    assert max(peaks) - baseline < ONE_REQUEST_MB  # used to be +7,500 MB (6.4 then 8.0 GB)
    assert max(idles) - baseline < IDLE_MB  # used to stay at 7.5 GB


def test_stalled_connections_from_many_addresses_leave_a_client_served(server) -> None:  # noqa: F811
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8192)), hard))
    srv = server().start()
    socks, times, codes = [], [], []
    try:
        for address in range(34):  # 34 x 64 = 2,176: each address at --connections-per-address, past the 2,048 cap
            for _ in range(64):
                sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5,
                                                source_address=(f"127.0.0.{address + 2}", 0))
                sock.sendall(b"POST /v1/forward HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n")  # never finished
                socks.append(sock)
        body = encode({"inputs/text.input_ids": torch.tensor([[101, 1037, 4937, 102]])})
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30) as client:
            for _ in range(75):
                start = time.monotonic()
                codes.append(client.post("/v1/forward", content=body).status_code)
                times.append(time.monotonic() - start)
    finally:
        for sock in socks:
            sock.close()
    p99 = sorted(times)[int(0.99 * len(times))]
    print(f"2,176 stalled connections from 34 addresses: {codes.count(200)} of 75 forwards served, "
          f"p50 {statistics.median(times) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    assert codes == [200] * 75  # 72 of 75 used to get 503
