"""The asynchronous client: submitted forwards equal synchronous ones (several in flight from one handle),
chunked and pipelined steps equal the whole batch's, mistakes raise at submit, a busy reply's queue depth
reaches ``queue_state``, and the delaying proxy delays as asked."""

from __future__ import annotations

import logging
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import graytune
from graytune.access.replies import QUEUED_HEADER
from graytune.bench.delay_proxy import DelayProxy
from tests.serve.conftest import ALICE

TEXTS = ["a small cat sleeps on the mat", "rain falls on the old roof", "two dogs", "a red kite over the hill",
         "the tea is cold", "seven bells ring at noon", "snow"]


def _edits(seed: int, rows: int = len(TEXTS)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"shift": (0.05 * torch.randn(1, 1, 384, generator=g)).requires_grad_(),  # broadcast over the rows
            "tokens": (0.05 * torch.randn(rows, 2, 384, generator=g)).requires_grad_(),  # one per row
            "inner": (0.05 * torch.randn(rows, 1, 384, generator=g)).requires_grad_()}


def _call(edits: dict[str, torch.Tensor]) -> dict[str, object]:
    return {"add": {"text.token_embeds": edits["shift"], "text.layer.4": edits["inner"]},
            "insert": {"text.token_embeds": edits["tokens"]}}


def _loss(z: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    return (z @ head).square().sum() + z[:, :7].sum()


def _grads(edits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.grad for k, v in edits.items()}  # type: ignore[misc]


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float, atol: float) -> None:
    """Each tensor within ``atol`` elementwise, or within ``rtol`` of its norm (sums over other row groupings
    round differently where terms cancel)."""
    for name in want:
        assert want[name].abs().sum() > 0, name
        error = float((got[name] - want[name]).norm() / want[name].norm())
        print(f"{name}: max abs difference {float((got[name] - want[name]).abs().max()):.1e}, relative {error:.1e}")
        assert error <= rtol or torch.allclose(got[name], want[name], rtol=0, atol=atol), (name, error)


def test_submitted_forwards_equal_synchronous_ones_several_in_flight_at_once(serve) -> None:
    url, _ = serve()
    handle = graytune.open_backbone(url, "light-gray", api_key=ALICE)
    batches = [TEXTS[:3], TEXTS[3:5], TEXTS[5:]]
    in_flight, most = [0], [0]
    real, lock = httpx.HTTPTransport(), threading.Lock()
    gate: list[threading.Barrier] = []  # once set, a forward passes only when all three are out at once

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/forward":
            with lock:
                in_flight[0] += 1
                most[0] = max(most[0], in_flight[0])
            if gate:
                gate[0].wait()
        response = real.handle_request(request)
        response.read()
        if request.url.path == "/v1/forward":
            with lock:
                in_flight[0] -= 1
        return response

    handle._http = httpx.Client(base_url=url, headers=handle._http.headers, transport=httpx.MockTransport(handler))
    ids = [handle.tokenize(b) for b in batches]
    refs = []
    for i, batch_ids in enumerate(ids):
        edits = _edits(i, len(batches[i]))
        z = handle.forward(batch_ids, **_call(edits))["text.embeds"]  # type: ignore[arg-type]
        z.square().sum().backward()
        refs.append((z.detach(), _grads(edits)))
    gate.append(threading.Barrier(len(batches), timeout=20))
    edits = [_edits(i, len(b)) for i, b in enumerate(batches)]
    futures = [handle.submit(batch_ids, **_call(e)) for batch_ids, e in zip(ids, edits)]  # type: ignore[arg-type]
    for future, e, (z_ref, g_ref) in zip(futures, edits, refs):
        z = future.result(timeout=60)["text.embeds"]
        assert z.requires_grad  # grad mode was on at submit, though the worker thread's own is its default
        z.square().sum().backward()
        torch.testing.assert_close(z.detach(), z_ref, rtol=0, atol=1e-6)
        _close(_grads(e), g_ref, rtol=0, atol=1e-6)
    assert most[0] == len(batches)
    gate.clear()
    with torch.no_grad():
        assert not handle.submit(ids[0], outputs=["text.embeds"]).result()["text.embeds"].requires_grad
    assert handle.stats()["sessions"] == 0
    handle.close()


def test_chunked_and_pipelined_steps_equal_the_whole_batch(serve) -> None:
    url, _ = serve()
    handle = graytune.open_backbone(url, "light-gray", reads=["text.token_embeds"], api_key=ALICE)
    head = torch.randn(384, 3, generator=torch.Generator().manual_seed(9))
    results = {}
    for way in ("whole", "chunks", "pipelined"):
        edits, h = _edits(0), head.clone().requires_grad_()
        if way == "pipelined":
            loss = handle.forward_backward({"text": TEXTS}, lambda out, rows: _loss(out["text.embeds"], h), chunks=3,
                                           reads=["text.token_embeds"], **_call(edits))  # type: ignore[arg-type]
            read = None
        else:
            forward = handle.forward if way == "whole" else lambda *a, **k: handle.forward_chunks(*a, chunks=3, **k)
            out = forward({"text": TEXTS}, reads=["text.token_embeds"], **_call(edits))
            loss, read = _loss(out["text.embeds"], h), out["text.token_embeds"]
            loss.backward()
        results[way] = (loss.detach(), read, {**_grads(edits), "head": h.grad})
    loss, read, grads = results["whole"]
    for way in ("chunks", "pipelined"):
        torch.testing.assert_close(results[way][0], loss, rtol=1e-5, atol=1e-5)
        _close(results[way][2], grads, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["chunks"][1], read, rtol=0, atol=1e-6)  # values read, joined by rows
    assert handle.exposure.gradient_samples == handle.stats()["grad_rows_used"] == 3 * len(TEXTS)
    assert handle.exposure.forward_queries == 1 + 3 + 3 and handle.stats()["sessions"] == 0
    handle.close()


def test_mistakes_raise_at_submit_not_from_the_future(serve) -> None:
    url, _ = serve(access="dark-gray", reads=())
    handle = graytune.open_backbone(url, "dark-gray", api_key=ALICE)
    with pytest.raises(graytune.errors.UnknownNameError):
        handle.submit({"text": ["a cat"]}, add={"text.token_embedz": torch.zeros(1, 1, 384)})
    with pytest.raises(graytune.InvalidInputError):
        handle.submit({"text": ["a cat"]}, add={"text.token_embeds": torch.zeros(1, 1, 7)})
    with pytest.raises(graytune.InvalidInputError, match="text input must be a list of strings"):
        handle.submit({"text": "a cat"})
    with pytest.raises(graytune.InvalidInputError, match="chunks must be a whole number >= 1; got 0"):
        handle.forward_chunks({"text": ["a cat"]}, chunks=0)
    with pytest.raises(graytune.InvalidInputError, match="loss_fn must return the chunk's loss as a one-element"):
        handle.forward_backward({"text": ["a cat", "a dog"]}, lambda out, rows: out["text.embeds"], chunks=2,
                                add={"text.token_embeds": torch.zeros(1, 1, 384, requires_grad=True)})
    assert handle._executor is not None and handle.stats()["sessions"] == 0  # the failed step left none behind
    handle.close()


def test_a_busy_replys_queue_depth_reaches_queue_state_and_the_log(serve, caplog) -> None:
    url, app = serve(access="dark-gray", reads=(), max_queue=0, request_timeout_s=20.0)
    handle = graytune.open_backbone(url, "dark-gray", api_key=ALICE, retry_s=30)
    ids = handle.tokenize(["a cat"])
    assert handle.queue_state is None
    lock = app.state.service.compute_lock
    lock.acquire()  # someone else's long step holds the backbone, one request of theirs waits
    try:
        with ThreadPoolExecutor(1) as pool, caplog.at_level(logging.WARNING, "graytune.access.remote"):
            waiting = pool.submit(handle.forward, ids, outputs=["text.embeds"])
            while app.state.service.queued < 1:
                time.sleep(0.01)
            future = handle.submit(ids, outputs=["text.embeds"])  # 503: the queue is full
            deadline = time.monotonic() + 20
            while handle.queue_state is None and time.monotonic() < deadline:
                time.sleep(0.01)
            lock.release()
            assert future.result(timeout=60)["text.embeds"].shape == (1, 384)  # retried after Retry-After
            assert waiting.result(timeout=60)["text.embeds"].shape == (1, 384)
    finally:
        if lock.locked():
            lock.release()
    state = handle.queue_state
    assert state is not None and state["status"] == 503 and state["queued"] == 1, state
    assert state["retry_after_s"] >= 1 and abs(state["at"] - time.time()) < 60
    assert "is busy (503, 1 in the queue); retrying" in caplog.text
    handle.close()


def test_a_busy_reply_without_the_header_leaves_the_depth_unknown() -> None:
    from graytune.access.replies import busy_state
    state = busy_state(httpx.Response(503, headers={"Retry-After": "2"}))
    assert state["queued"] is None and state["retry_after_s"] == 2.0
    assert busy_state(httpx.Response(503, headers={QUEUED_HEADER: "9"}))["queued"] == 9


def test_the_proxy_adds_about_the_delay_it_is_asked_for(serve) -> None:
    url, _ = serve(access="dark-gray", reads=())
    with DelayProxy(url, one_way_s=0.05) as slow, httpx.Client(base_url=slow, timeout=30) as client:
        start = time.perf_counter()
        assert client.get("/v1/health").status_code == 200
        first = time.perf_counter() - start  # a new connection: the handshake's round trip, then the request's
        times = []
        for _ in range(5):
            start = time.perf_counter()
            client.get("/v1/health")
            times.append(time.perf_counter() - start)
        print(f"through a 50 ms each-way proxy: first request {first * 1000:.0f} ms, then median "
              f"{statistics.median(times) * 1000:.0f} ms")
        assert first >= 0.19 and 0.1 <= statistics.median(times) < 0.25
        handle = graytune.open_backbone(slow, "dark-gray", api_key=ALICE)  # a pipelined step through it works
        shift = torch.zeros(1, 1, 384, requires_grad=True)
        handle.forward_backward({"text": TEXTS[:4]}, lambda out, rows: out["text.embeds"].sum(), chunks=2,
                                add={"text.token_embeds": shift})
        assert shift.grad is not None and shift.grad.abs().sum() > 0
        handle.close()
