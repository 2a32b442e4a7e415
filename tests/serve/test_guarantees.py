"""The server's guarantees under hostile use (issue 32 item 4): JSON bounded by structure, hosted classify charged
by its work, no unbounded cache, recomputes that skip no quota, one line for a client that goes away, stalled
uploads that hold no budget, duplicate rows judged on what the backbone sees, and stalled connections from many
addresses that leave an authenticated client served (loopback, small numbers)."""

from __future__ import annotations

import itertools
import json
import logging
import socket
import time

import httpx
import pytest
import torch

from graytune.access.wire import encode
from graytune.serve.bodies import json_limit
from graytune.serve.routes.hosted import install_adapters
from tests.serve.conftest import ALICE
from tests.serve.test_hosted_adapters import _saved

IDS = {"inputs/text.input_ids": torch.tensor([[101, 1037, 4937, 102]])}
GRAD = {"grad": ["add/text.token_embeds"]}


def _client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60)


def test_json_bodies_are_bounded_by_size_and_structure_before_parsing(serve) -> None:
    url, app = serve(access="dark-gray", reads=(), max_texts=10, max_request_chars=1000)
    limit = json_limit(app.state.service.config)  # 77,616 bytes for these text limits
    with _client(url) as client:
        nested = b'{"texts": ' + b"[" * (limit // 2) + b"]" * (limit // 2) + b"}"
        huge = client.post("/v1/tokenize", content=nested, headers={"Content-Type": "application/json"})
        assert huge.status_code == 413 and "JSON bodies" in huge.json()["detail"], huge.text  # before reading it
        many = client.post("/v1/tokenize", content=b'{"texts": [' + b"0," * 20_000 + b"0]}")
        assert many.status_code == 413 and "20,00" in many.json()["detail"] and "--max-texts" in many.text
        deep = client.post("/v1/tokenize", content=b'{"texts": ' + b"[" * 20 + b"]" * 20 + b"}")
        assert deep.status_code == 400 and "too deeply (21 levels" in deep.json()["detail"]
        commas = client.post("/v1/tokenize", json={"texts": ["a, b, [c] {d}: e" * 6] * 10})  # inside strings
        assert commas.status_code == 200, commas.text
    url, _ = serve(access="dark-gray", reads=())  # the defaults: the largest body the text limits allow passes
    body = json.dumps({"texts": ["\U0001f600" * 64] * 4096}, ensure_ascii=True).encode()  # 12 bytes a character
    with _client(url) as client:
        largest = client.post("/v1/tokenize", content=body, headers={"Content-Type": "application/json"})
        assert largest.status_code == 200, largest.text[:300]


@pytest.fixture(scope="module")
def adapter_folder(minilm, tmp_path_factory) -> str:  # type: ignore[no-untyped-def]
    return str(_saved(minilm, "output", 3, tmp_path_factory.mktemp("hosted") / "out"))


def test_hosted_classify_is_charged_one_sample_per_row_and_per_class(serve, adapter_folder) -> None:
    url, _ = serve(access="dark-gray", reads=(), adapters=(f"out={adapter_folder}",), extra=install_adapters)
    classes = ["cat", "dog", "bird", "fish", "horse"]
    with _client(url) as client:
        answer = client.post("/v1/adapters/out/classify", content=encode({}, {"texts": ["a cat", "a dog"],
                                                                              "classes": classes}))
        assert answer.status_code == 200, answer.text
        assert client.get("/v1/stats").json()["samples_used"] == 2 + 5  # the rows, and one prompt per class
        assert client.post("/v1/adapters/out/embed", content=encode({}, {"texts": ["a cat"]})).status_code == 200
        assert client.get("/v1/stats").json()["samples_used"] == 2 + 5 + 1


def test_the_spec_cache_holds_one_entry_per_level_whatever_the_spelling(serve) -> None:
    url, app = serve(access="dark-gray", reads=())
    spellings = ["".join(c) for c in itertools.product(*[(ch.lower(), ch.upper()) for ch in "dark_gray"])][:200]
    with _client(url) as client:
        for spelling in spellings:
            assert client.get("/v1/spec", params={"access": f" {spelling} "}).json()["access"] == "dark-gray"
    assert len(app.state.service._specs) == 1  # it held one entry per spelling (200 here)


def test_a_recompute_without_its_forward_pays_its_samples(serve) -> None:
    url, _ = serve(access="dark-gray", reads=())
    shift = torch.zeros(1, 1, 384)
    forward = encode({**IDS, "add/text.token_embeds": shift}, GRAD)
    recompute = encode({**IDS, "add/text.token_embeds": shift, "grad/text.embeds": torch.ones(1, 384)},
                       {**GRAD, "recompute": True})
    with _client(url) as client:
        def used() -> tuple[int, int]:
            stats = client.get("/v1/stats").json()
            return stats["samples_used"], stats["grad_rows_used"]

        assert client.post("/v1/vjp", content=recompute).status_code == 200
        assert used() == (1, 1)  # no forward was paid: the recompute pays its sample (it paid none)
        assert client.post("/v1/forward", content=forward).status_code == 200
        assert client.post("/v1/vjp", content=recompute).status_code == 200
        assert used() == (2, 2)  # the lost session's recompute: its forward was paid once, its gradient once
        assert client.post("/v1/vjp", content=recompute).status_code == 200
        assert used() == (3, 3)  # the forward's receipt was used up: the same recompute again pays


def test_a_client_that_goes_away_mid_body_is_one_short_log_line(serve, caplog) -> None:
    url, _ = serve(access="dark-gray", reads=())
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(f"POST /v1/forward HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n"
                             "Content-Length: 100000\r\n\r\n".encode() + b"x" * 10)
                time.sleep(0.3)
            time.sleep(0.5)
            with _client(url) as client:  # still serving
                assert client.post("/v1/forward", content=encode(IDS)).status_code == 200
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]
    lines = [r.getMessage() for r in caplog.records if "went away" in r.getMessage()]
    assert len(lines) == 1 and "10 of 100000 body bytes" in lines[0] and "\n" not in lines[0]


def test_declared_body_sizes_hold_no_in_flight_budget_before_the_bytes_arrive(serve) -> None:
    url, app = serve(access="dark-gray", reads=(), inflight_body_mb=1.0, body_timeout_s=30)
    host, port = url.removeprefix("http://").split(":")
    declared = app.state.service.inflight_budget // 2  # counted twice: the whole budget, if declared sizes counted
    stalled = []
    try:
        for _ in range(4):
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(f"POST /v1/forward HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n"
                         f"Content-Length: {declared}\r\n\r\n".encode() + b"x" * 10)
            stalled.append(sock)
        time.sleep(0.3)
        with _client(url) as client:
            codes = [client.post("/v1/forward", content=encode(IDS)).status_code for _ in range(3)]
        assert codes == [200] * 3, codes
        assert app.state.service.inflight <= 4 * 2 * 10
    finally:
        for sock in stalled:
            sock.close()


def test_rows_that_differ_only_under_the_mask_are_duplicates(serve) -> None:
    url, _ = serve(access="dark-gray", reads=(), duplicate_rows="refuse")
    rows = 4
    ids = torch.tensor([[101, 1037, 4937, 102, 0]]).repeat(rows, 1)
    ids[:, 4] = torch.arange(rows) + 2000  # a different token id in each row, under mask 0
    mask = torch.tensor([[1, 1, 1, 1, 0]]).repeat(rows, 1)
    shift = torch.zeros(rows, 5, 384)
    shift[:, 4, 0] = torch.arange(rows, dtype=torch.float32)  # a different edit in each row, under mask 0
    body = {"inputs/text.input_ids": ids, "inputs/text.attention_mask": mask, "add/text.token_embeds": shift}
    with _client(url) as client:
        refused = client.post("/v1/forward", content=encode(body, GRAD))
        assert refused.status_code == 403 and refused.json()["error"] == "duplicate_rows", refused.text
        assert "3 of them repeat an earlier row" in refused.json()["detail"]
        shift[:, 3, 0] = torch.arange(rows, dtype=torch.float32)  # now they differ where the backbone looks
        assert client.post("/v1/forward", content=encode(body, GRAD)).status_code == 200


def _stall_from(url: str, addresses: int, each: int) -> list[socket.socket]:
    """``each`` half-sent request heads from each of ``addresses`` loopback addresses (127.0.0.2, ...)."""
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for a in range(addresses):
        for _ in range(each):
            sock = socket.create_connection((host, int(port)), timeout=5, source_address=(f"127.0.0.{a + 2}", 0))
            sock.sendall(b"POST /v1/forward HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n")  # never finished
            socks.append(sock)
    return socks


def test_stalled_connections_from_many_addresses_leave_a_client_served(serve) -> None:
    url, _ = serve(access="dark-gray", reads=(), connections_per_address=8, max_connections=64)
    socks = _stall_from(url, addresses=20, each=8)  # 160 waiting connections: 2.5x the connection cap
    try:
        with _client(url) as client:
            codes = [client.post("/v1/forward", content=encode(IDS)).status_code for _ in range(10)]
        assert codes == [200] * 10, codes  # it used to answer 503 (uvicorn's cap) to every one
        time.sleep(2.5)  # under pressure a waiting connection gets 2 s for its head, not --header-timeout-s (10)
        assert sum(s.fileno() != -1 and _open(s) for s in socks) <= 64 // 2
    finally:
        for sock in socks:
            sock.close()


def _open(sock: socket.socket) -> bool:
    sock.settimeout(0.01)
    try:
        return sock.recv(1) != b""
    except TimeoutError:
        return True
    except OSError:
        return False
