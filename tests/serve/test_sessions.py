"""The session store: TTL, byte budget, per-client caps, LRU eviction, client binding."""

from __future__ import annotations

import pytest

from graytune.serve.sessions import SessionGone, SessionStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _store(clock: Clock, **limits: int) -> SessionStore:
    options = dict(ttl_s=10, budget_bytes=1000, per_client_sessions=3, per_client_bytes=600)
    return SessionStore(**{**options, **limits}, clock=clock)  # type: ignore[arg-type]


def test_a_session_is_taken_once_by_its_own_client() -> None:
    store = _store(Clock())
    sid = store.put("alice", "call", 10)
    assert sid is not None and len(sid) >= 40 and sid != store.put("alice", "other", 10)
    with pytest.raises(SessionGone):  # another client's id reads as an unknown one
        store.take("bob", sid)
    assert store.release("bob", sid) is False
    assert store.take("alice", sid) == "call"
    with pytest.raises(SessionGone):
        store.take("alice", sid)


def test_sessions_expire_after_the_ttl() -> None:
    clock = Clock()
    store = _store(clock)
    sid = store.put("alice", "call", 10)
    clock.now = 9.9
    assert store.peek("alice", sid) == "call"
    clock.now = 10.0
    assert store.sweep() == 0
    with pytest.raises(SessionGone):
        store.take("alice", sid)
    assert store.stats()["expired"] == 1


def test_the_byte_budget_evicts_the_least_recently_made() -> None:
    store = _store(Clock(), per_client_bytes=1000, per_client_sessions=10)
    ids = [store.put(client, i, 300) for i, client in enumerate(["a", "b", "c", "d"])]
    assert store.stats()["bytes"] <= 1000 and store.stats()["evicted"] == 1
    with pytest.raises(SessionGone):
        store.take("a", ids[0])  # the oldest went first
    assert store.take("d", ids[3]) == 3


def test_per_client_caps_evict_only_that_client() -> None:
    store = _store(Clock())
    theirs = store.put("bob", "b", 10)
    mine = [store.put("alice", i, 10) for i in range(4)]  # cap of 3 sessions
    with pytest.raises(SessionGone):
        store.take("alice", mine[0])
    assert store.take("bob", theirs) == "b"
    big = [store.put("alice", i, 250) for i in range(3)]  # 600 bytes per client
    with pytest.raises(SessionGone):
        store.take("alice", big[0])
    assert store.put("alice", "huge", 700) is None  # alone over the cap: not kept; the VJP recomputes


def test_an_evicted_session_frees_its_graph(minilm) -> None:  # type: ignore[no-untyped-def]
    import gc
    import weakref

    import torch

    def call():  # type: ignore[no-untyped-def]
        shift = torch.zeros(1, 1, 384, requires_grad=True)
        plan = minilm.plan({"text": ["a cat on a mat", "rain"]}, {"text.token_embeds": shift}, {}, None, [])
        c = minilm.open_call(plan, measure=True)
        c.forward([plan.tensor(g, p) for g, p in plan.slots])
        return c

    first = call()
    assert first.nbytes > 0
    refs = [weakref.ref(first._graph[0][0]), weakref.ref(first._graph[1][0])]  # an output and the leaf
    store = SessionStore(ttl_s=60, budget_bytes=first.nbytes, per_client_sessions=8, per_client_bytes=1 << 40)
    store.put("alice", first, first.nbytes)
    del first
    store.put("alice", call(), 1)  # over the budget: the first goes
    gc.collect()
    assert [r() for r in refs] == [None, None]  # nothing keeps the evicted graph alive


def test_api_key_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from graytune.errors import InvalidInputError
    from graytune.serve.config import ApiKeys

    path = tmp_path / "keys.txt"
    path.write_text("# owner's clients\nalice  aaaaaaaaaaaaaaaaaaaa\nbob bbbbbbbbbbbbbbbbbbbb  # lab\n\n")
    keys = ApiKeys.load(path)
    assert keys.client("Bearer aaaaaaaaaaaaaaaaaaaa") == "alice"
    assert keys.client("bearer bbbbbbbbbbbbbbbbbbbb") == "bob"
    assert keys.client("Bearer aaaaaaaaaaaaaaaaaaab") is None
    assert keys.client("Basic aaaaaaaaaaaaaaaaaaaa") is None and keys.client(None) is None
    path.write_text("alice aaaaaaaaaaaaaaaaaaaa extra\n")
    with pytest.raises(InvalidInputError, match=":1: expected"):
        ApiKeys.load(path)
    with pytest.raises(InvalidInputError, match="does not exist"):
        ApiKeys.load(tmp_path / "missing.txt")


def test_over_the_budget_the_client_holding_most_loses_its_own_first() -> None:
    store = _store(Clock(), budget_bytes=800, per_client_bytes=600, per_client_sessions=10)
    others = [store.put(client, client, 100) for client in ("a", "b")]
    abandoned = [store.put("hog", i, 100) for i in range(6)]  # 800 bytes in all: the budget is full
    store.put("a", "new", 100)  # over the budget: the hog's oldest goes, not b's or a's older session
    with pytest.raises(SessionGone):
        store.take("hog", abandoned[0])
    assert store.take("a", others[0]) == "a" and store.take("b", others[1]) == "b"
    assert store.stats("hog") == {"sessions": 5, "bytes": 500, "evicted": 1, "expired": 0}
    assert store.stats("a")["evicted"] == 0


def test_the_default_per_client_cap_is_well_under_the_budget() -> None:
    from graytune.serve import ServeConfig

    config = ServeConfig()
    assert config.client_session_mb <= config.session_budget_mb / 4


def test_sessions_expire_on_a_timer_with_no_traffic(serve) -> None:  # type: ignore[no-untyped-def]
    import time

    import torch

    import graytune
    from tests.serve.conftest import ALICE

    url, app = serve(access="dark-gray", reads=(), session_ttl_s=0.4)
    handle = graytune.open_backbone(url, "dark-gray", api_key=ALICE)
    shift = torch.zeros(1, 1, 384, requires_grad=True)
    handle.forward({"text": ["abandoned"]}, add={"text.token_embeds": shift})  # never differentiated
    store = app.state.service.store
    assert store.stats()["sessions"] == 1
    deadline = time.monotonic() + 5
    while store.stats()["sessions"] and time.monotonic() < deadline:  # no request arrives meanwhile
        time.sleep(0.05)
    assert store.stats()["sessions"] == 0 and store.stats()["expired"] == 1
