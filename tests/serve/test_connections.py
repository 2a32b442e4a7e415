"""Slow and idle connections cannot starve anyone: a request-head deadline, a per-address cap on
connections that are not inside a request, and a body deadline (loopback, small numbers)."""

from __future__ import annotations

import socket
import time

import httpx
import torch

from graytune.access.wire import encode
from tests.serve.conftest import ALICE

IDS = {"inputs/text.input_ids": torch.tensor([[101, 1037, 4937, 102]])}
HALF_HEADER = b"POST /v1/forward HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"


def _stalled(url: str, count: int) -> list[socket.socket]:
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(HALF_HEADER)
        socks.append(sock)
    return socks


def _closed(sock: socket.socket, wait_s: float) -> bool:
    """Whether the server closed ``sock`` within ``wait_s``."""
    sock.settimeout(wait_s)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


def test_a_connection_that_never_finishes_its_headers_is_closed(serve) -> None:
    url, _ = serve(access="dark-gray", reads=(), header_timeout_s=0.5)
    (sock,) = _stalled(url, 1)
    start = time.monotonic()
    try:
        assert _closed(sock, 5.0)
    finally:
        sock.close()
    assert time.monotonic() - start < 2.0


def test_stalled_connections_from_one_address_cannot_starve_a_client(serve) -> None:
    url, _ = serve(access="dark-gray", reads=(), connections_per_address=8, max_connections=40)
    socks = _stalled(url, 60)  # more than the server's whole connection limit
    try:
        times = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30) as client:
            for _ in range(5):
                start = time.monotonic()
                assert client.post("/v1/forward", content=encode(IDS)).status_code == 200
                times.append(time.monotonic() - start)
        still_open = sum(not _closed(s, 0.05) for s in socks)
    finally:
        for s in socks:
            s.close()
    assert max(times) < 1.0, times
    assert still_open <= 8  # the oldest stalled connections were closed as new ones came


def test_a_body_that_stalls_gets_408(serve) -> None:
    url, _ = serve(access="dark-gray", reads=(), body_timeout_s=0.5)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/forward HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALICE.encode()
                     + b"\r\nContent-Length: 1000\r\n\r\n" + b"\0" * 10)
        start = time.monotonic()
        answer = b""
        while b"--body-timeout-s" not in answer and time.monotonic() - start < 5.0:
            chunk = sock.recv(4096)  # head and body may come in separate segments
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout-s" in answer, answer[:300]
    assert time.monotonic() - start < 3.0
