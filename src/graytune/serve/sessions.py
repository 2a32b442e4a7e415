"""What the server keeps between a forward and its VJP: sessions, bounded every way.

A session is one ``graytune.access.BoundaryCall`` waiting for its gradient, stored under an
unguessable id bound to the client that made it. Another client's id answers exactly as
an unknown one does (``SessionGone``), so ids reveal nothing about other clients. The
store is bounded by a time-to-live (the server sweeps on a timer too), a total byte budget
(the bytes autograd saved for the backward) and per-client caps on count and bytes. Past a
per-client cap that client's least recently made session goes; past the total budget the
client holding the most bytes loses its oldest session first, so one client's abandoned
sessions never push out everyone else's. A forward retried under the same request key
replaces the session of its earlier attempt instead of leaving an orphan. A missing session
is not an error for the client: the VJP answers 410 and the client resends its inputs.

Example:
    >>> store = SessionStore(ttl_s=60, budget_bytes=2 << 30, per_client_sessions=64, per_client_bytes=1 << 28)
    >>> sid = store.put("alice", call, call.nbytes)
    >>> store.take("alice", sid) is call
    True
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any


class SessionGone(LookupError):
    """The session expired, was evicted, belongs to another client or never existed here (410)."""


@dataclass
class _Entry:
    client: str
    call: Any
    nbytes: int
    expires: float
    key: str | None


class SessionStore:
    """Thread-safe store of pending boundary calls, oldest first."""

    def __init__(self, ttl_s: float, budget_bytes: int, per_client_sessions: int, per_client_bytes: int,
                 clock: Any = time.monotonic) -> None:
        self.ttl_s, self.budget_bytes = ttl_s, budget_bytes
        self.per_client_sessions, self.per_client_bytes = per_client_sessions, per_client_bytes
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._evicted: Counter[str] = Counter()
        self._expired: Counter[str] = Counter()

    @property
    def evicted(self) -> int:
        return sum(self._evicted.values())

    @property
    def expired(self) -> int:
        return sum(self._expired.values())

    def put(self, client: str, call: Any, nbytes: int, key: str | None = None) -> str | None:
        """Keep ``call`` for ``client``; ``None`` when it cannot be kept (the VJP will recompute).

        ``key`` names the client's request: a session already kept under the same key (an
        earlier attempt of a retried forward) is dropped.
        """
        if nbytes > min(self.budget_bytes, self.per_client_bytes):
            return None
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._expire()
            if key is not None:
                for old in [s for s, e in self._entries.items() if e.client == client and e.key == key]:
                    del self._entries[old]
            self._entries[sid] = _Entry(client, call, nbytes, self._clock() + self.ttl_s, key)
            self._shrink(client)
            return sid if sid in self._entries else None

    def peek(self, client: str, sid: str) -> Any:
        """The session's call, left in place; ``SessionGone`` otherwise."""
        with self._lock:
            return self._find(client, sid).call

    def take(self, client: str, sid: str) -> Any:
        """Remove and return the session's call; ``SessionGone`` otherwise."""
        with self._lock:
            self._find(client, sid)
            return self._entries.pop(sid).call

    def _find(self, client: str, sid: str) -> _Entry:
        self._expire()
        entry = self._entries.get(sid) if isinstance(sid, str) else None
        if entry is None or entry.client != client:  # another client's id reads as an unknown one
            raise SessionGone("no such session")
        return entry

    def release(self, client: str, sid: str) -> bool:
        """Drop a session the client will not differentiate; ``False`` if it is not there (or not theirs)."""
        try:
            self.take(client, sid)
        except SessionGone:
            return False
        return True

    def sweep(self) -> int:
        """Drop expired sessions now; how many are left."""
        with self._lock:
            self._expire()
            return len(self._entries)

    def stats(self, client: str | None = None) -> dict[str, Any]:
        """Counts and bytes of ``client``'s sessions; with ``None``, the totals and each client's."""
        with self._lock:
            if client is not None:
                mine = [e.nbytes for e in self._entries.values() if e.client == client]
                return {"sessions": len(mine), "bytes": sum(mine), "evicted": self._evicted[client],
                        "expired": self._expired[client]}
            names = sorted({e.client for e in self._entries.values()} | set(self._evicted) | set(self._expired))
            clients = {}
            for name in names:
                mine = [e.nbytes for e in self._entries.values() if e.client == name]
                clients[name] = {"sessions": len(mine), "bytes": sum(mine), "evicted": self._evicted[name],
                                 "expired": self._expired[name]}
            return {"sessions": len(self._entries), "bytes": self._bytes(), "evicted": self.evicted,
                    "expired": self.expired, "clients": clients}

    def _bytes(self, client: str | None = None) -> int:
        return sum(e.nbytes for e in self._entries.values() if client is None or e.client == client)

    def _expire(self) -> None:
        now = self._clock()
        for sid in [sid for sid, e in self._entries.items() if e.expires <= now]:
            self._expired[self._entries.pop(sid).client] += 1

    def _shrink(self, client: str) -> None:
        def over_client() -> bool:
            mine = [e for e in self._entries.values() if e.client == client]
            return len(mine) > self.per_client_sessions or sum(e.nbytes for e in mine) > self.per_client_bytes

        while over_client():
            self._evict(next(sid for sid, e in self._entries.items() if e.client == client))
        while self._bytes() > self.budget_bytes:
            held = Counter[str]()
            for e in self._entries.values():
                held[e.client] += e.nbytes
            most = max(held.values())
            self._evict(next(sid for sid, e in self._entries.items() if held[e.client] == most))

    def _evict(self, sid: str) -> None:
        self._evicted[self._entries.pop(sid).client] += 1
