"""Deadlines free the backbone, a full queue answers 503 with Retry-After at once, and health, spec,
stats and releases never wait for the backbone."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from graytune.access.wire import encode
from tests.serve.conftest import ALICE, BOB

IDS = {"inputs/text.input_ids": torch.tensor([[101, 1037, 4937, 102]]),
       "inputs/text.attention_mask": torch.ones(1, 4, dtype=torch.long)}


def _client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60)


def _big_forward() -> bytes:
    """64 rows x 128 tokens with a gradient: the most --max-tokens allows, a few seconds on 2 cores."""
    ids = torch.randint(1000, 20000, (64, 128), generator=torch.Generator().manual_seed(0))
    return encode({"inputs/text.input_ids": ids, "add/text.token_embeds": torch.zeros(1, 1, 384)},
                  {"grad": ["add/text.token_embeds"]})


def test_a_request_past_its_deadline_stops_and_frees_the_backbone(serve) -> None:
    url, app = serve(access="dark-gray", reads=(), request_timeout_s=0.5)
    lock = app.state.service.compute_lock
    with _client(url) as client:
        client.post("/v1/forward", content=encode(IDS))  # warm
        start = time.monotonic()
        response = client.post("/v1/forward", content=_big_forward())
        answered = time.monotonic() - start
        free = lock.acquire(timeout=1.0)  # the backbone is free within a second of the deadline
        waited = time.monotonic() - start - answered
        if free:
            lock.release()
    print(f"deadline 0.5 s: 504 after {answered:.2f} s, backbone free {waited:.3f} s later")
    assert free, f"the backbone was still busy {waited:.2f} s after the 504"
    assert response.status_code == 504 and "--request-timeout-s" in response.json()["detail"], response.text
    assert answered < 0.5 + 1.0, answered
    assert app.state.service.stats("alice")["samples_used"] == 1  # the warm-up only: work not served is not charged


def test_a_recompute_past_its_deadline_stops_too(serve) -> None:
    url, app = serve(access="dark-gray", reads=(), request_timeout_s=0.5)
    ids = torch.randint(1000, 20000, (64, 128), generator=torch.Generator().manual_seed(0))
    body = encode({"inputs/text.input_ids": ids, "add/text.token_embeds": torch.zeros(1, 1, 384),
                   "grad/text.embeds": torch.ones(64, 384)}, {"grad": ["add/text.token_embeds"], "recompute": True})
    with _client(url) as client:
        response = client.post("/v1/vjp", content=body)
        free = app.state.service.compute_lock.acquire(timeout=1.0)
    assert response.status_code == 504 and free
    app.state.service.compute_lock.release()
    assert app.state.service.stats("alice")["grad_rows_used"] == 0


def test_a_full_queue_answers_503_with_retry_after_at_once(serve) -> None:
    url, app = serve(access="dark-gray", reads=(), request_timeout_s=10.0, max_queue=1)
    lock = app.state.service.compute_lock
    lock.acquire()  # a long step of someone else's holds the backbone
    try:
        with ThreadPoolExecutor(2) as pool, _client(url) as client:
            waiting = [pool.submit(client.post, "/v1/forward", content=encode(IDS)) for _ in range(2)]
            deadline = time.monotonic() + 5
            while app.state.service.queued < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            start = time.monotonic()
            refused = client.post("/v1/forward", content=encode(IDS))
            took = time.monotonic() - start
            lock.release()
            assert [w.result().status_code for w in waiting] == [200, 200]
    finally:
        if lock.locked():
            lock.release()
    print(f"queue full: 503 after {took * 1000:.0f} ms, Retry-After {refused.headers.get('retry-after')}")
    assert refused.status_code == 503 and took < 1.0, (refused.text, took)
    assert int(refused.headers["retry-after"]) >= 1 and "--max-queue" in refused.json()["detail"]


def test_health_spec_stats_and_release_never_wait_for_the_backbone(serve) -> None:
    url, app = serve(access="dark-gray", reads=(), request_timeout_s=20.0)
    lock = app.state.service.compute_lock
    lock.acquire()  # the backbone is saturated: 45 requests want it and none gets it
    flood = ThreadPoolExecutor(45)
    clients = [_client(url) for _ in range(45)]
    try:
        queued = [flood.submit(c.post, "/v1/forward", content=encode(IDS)) for c in clients]
        time.sleep(1.0)
        times: dict[str, list[float]] = {}
        with _client(url) as client:
            for route, call in [("health", lambda: client.get("/v1/health")), ("spec", lambda: client.get("/v1/spec")),
                                ("stats", lambda: client.get("/v1/stats")),
                                ("release", lambda: client.post("/v1/sessions/release", json={"session": "x" * 43}))]:
                for _ in range(20):
                    start = time.monotonic()
                    assert call().status_code == 200
                    times.setdefault(route, []).append(time.monotonic() - start)
    finally:
        lock.release()
        statuses = sorted(q.result().status_code for q in queued)
        flood.shutdown()
        for c in clients:
            c.close()
    print("45 requests held off the backbone; slowest of 20: " + ", ".join(
        f"{route} {max(took) * 1000:.0f} ms" for route, took in times.items()))
    # The lock is held until every call above has answered, so a call that waited for the backbone would never get
    # its 200 (it would end in the 20 s deadline's 503): the 200s are the proof. The times only guard against a slow
    # path: the median must be quick, and one call may be slowed by the machine (a 0.63 s outlier was seen on a
    # loaded 2-core CI machine), never anywhere near the deadline.
    for route, took in times.items():
        assert statistics.median(took) < 0.1 and max(took) < 5.0, \
            f"{route}: median {statistics.median(took):.3f} s, slowest {max(took):.3f} s with the backbone saturated"
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 45 - 9  # at most --max-queue wait, one runs


def test_a_stopped_forward_leaves_no_state_behind_for_other_clients(serve, tmp_path, monkeypatch) -> None:
    """Regression: a forward without gradients stopped by its deadline left its worker thread with autograd
    off, so every later gradient forward on that thread kept no session and training failed at step 0."""
    from safetensors.torch import load_file

    from graytune.recipes.run import RunSpec, train_and_save
    from graytune.train.trainer import TrainConfig

    url, app = serve(access="dark-gray", reads=(), request_timeout_s=0.5)
    big = encode({"inputs/text.input_ids": torch.randint(1000, 20000, (128, 128),
                                                         generator=torch.Generator().manual_seed(0))})
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {BOB}"}, timeout=60) as bob:
        for _ in range(3):  # on each worker thread the pool may hand the next request to
            assert bob.post("/v1/forward", content=big).status_code == 504
    app.state.service.config.request_timeout_s = 60.0  # alice's steps must not meet the deadline themselves
    monkeypatch.setenv("GRAYTUNE_API_KEY", ALICE)
    config = TrainConfig(lr=3e-3, max_steps=3, batch_size=8, seed=3)
    for where, backbone in (("local", "minilm"), ("remote", url)):
        train_and_save(RunSpec(backbone, "dark-gray", "dga", "wordnet-supersense", out=str(tmp_path / where),
                               train=config), progress=False)
    local = load_file(str(tmp_path / "local" / "adapter_model.safetensors"))
    remote = load_file(str(tmp_path / "remote" / "adapter_model.safetensors"))
    assert any(t.abs().sum() > 0 for t in local.values())
    for key in local:
        assert torch.equal(remote[key], local[key]), key
