"""The client rides out restarts for a time budget, honours Retry-After, never multiplies a timeout,
and leaves no orphan session when it retries a forward (fake clock: no test waits for real)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
import torch

import graytune
from graytune.access import remote as remote_module
from tests.serve.conftest import ALICE


class FakeTime:
    """Stands for the ``time`` module in ``graytune.access.remote``: sleeping moves the clock."""

    def __init__(self) -> None:
        self.now, self.slept = 1000.0, []  # type: ignore[var-annotated]

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def faulty(serve, monkeypatch):  # type: ignore[no-untyped-def]
    """``faulty(fault, **handle_options) -> (handle, app, attempts)``: alice's handle on a live server whose
    requests first pass through ``fault(request, attempt, send)`` (raise to fail, ``send(request)`` to deliver)."""
    clock = FakeTime()
    monkeypatch.setattr(remote_module, "time", clock)
    url, app = serve(access="dark-gray", reads=())

    def make(fault: Callable, **options):  # type: ignore[no-untyped-def]
        handle = graytune.open_backbone(url, "dark-gray", api_key=ALICE, **options)
        real = httpx.HTTPTransport()
        attempts: list[str] = []

        def handler(request: httpx.Request) -> httpx.Response:
            attempts.append(request.url.path)
            if request.url.path == "/v1/tokenize":  # faults hit the backbone's routes
                return real.handle_request(request)
            response = fault(request, len(attempts) - attempts.count("/v1/tokenize"),
                             lambda r: real.handle_request(r))
            response.read()
            return response

        handle._http = httpx.Client(base_url=url, headers=handle._http.headers, transport=httpx.MockTransport(handler))
        return handle, app, attempts, clock

    return make


def test_a_server_down_for_minutes_costs_time_not_an_error(faulty) -> None:
    def down_for_90_s(request, attempt, send):  # type: ignore[no-untyped-def]
        if clock.now < 1090:
            raise httpx.ConnectError("connection refused")
        return send(request)

    handle, _, attempts, clock = faulty(down_for_90_s)
    assert handle.encode_text(["a cat"]).shape == (1, 384)
    assert len(attempts) > 6 and 90 <= clock.now - 1000 <= 100  # more than the old 5 retries, within the budget
    assert max(clock.slept) <= 10.0


def test_the_budget_ends_with_an_error_naming_it(faulty) -> None:
    handle, _, attempts, clock = faulty(lambda request, attempt, send: (_ for _ in ()).throw(
        httpx.ConnectError("connection refused")), retry_s=30)
    with pytest.raises(graytune.errors.RemoteError, match=r"gave up after \d+ tries .*retry_s=30"):
        handle.encode_text(["a cat"])
    assert clock.now - 1000 <= 30


def test_a_503_is_retried_after_its_retry_after(faulty) -> None:
    def busy_twice(request, attempt, send):  # type: ignore[no-untyped-def]
        if attempt <= 2:
            return httpx.Response(503, headers={"Retry-After": "7"}, json={"error": "busy", "detail": "busy"})
        return send(request)

    handle, _, _, clock = faulty(busy_twice)
    handle.encode_text(["a cat"])
    assert clock.slept == [7.0, 7.0]


def test_a_timed_out_attempt_is_not_retried(faulty) -> None:
    def slow(request, attempt, send):  # type: ignore[no-untyped-def]
        raise httpx.ReadTimeout("no answer")

    handle, _, attempts, _ = faulty(slow, timeout_s=3)
    with pytest.raises(graytune.errors.RemoteError, match=r"no answer within 3 s \(timeout_s\); it was not retried"):
        handle.encode_text(["a cat"])
    assert attempts == ["/v1/tokenize", "/v1/forward"]  # one attempt: 3 s stays 3 s


def test_a_retried_forward_leaves_no_orphan_session(faulty) -> None:
    def answer_lost_once(request, attempt, send):  # type: ignore[no-untyped-def]
        response = send(request)
        if attempt == 1:  # the server made the session, then the connection dropped
            response.read()
            raise httpx.RemoteProtocolError("server disconnected without sending a response")
        return response

    handle, app, attempts, _ = faulty(answer_lost_once)
    shift = torch.zeros(1, 1, 384, requires_grad=True)
    z = handle.forward({"text": ["a cat"]}, add={"text.token_embeds": shift})["text.embeds"]
    assert attempts == ["/v1/tokenize", "/v1/forward", "/v1/forward"]
    assert app.state.service.store.stats()["sessions"] == 1  # the retry replaced its first attempt's session
    z.sum().backward()
    assert shift.grad is not None and app.state.service.store.stats()["sessions"] == 0


def test_retry_options_are_refused_for_an_in_process_backbone() -> None:
    with pytest.raises(graytune.InvalidInputError, match="retry_s apply to a backbone server"):
        graytune.open_backbone("minilm", retry_s=300)
    with pytest.raises(graytune.InvalidInputError, match="timeout_s apply"):
        graytune.open_backbone("minilm", timeout_s=5)
