"""What the server keeps between a forward and its VJP: sessions, bounded every way.

A session is one ``graytune.access.BoundaryCall`` waiting for its gradient, stored under an
unguessable id bound to the client that made it. The store is bounded by a
time-to-live, a total byte budget (the bytes autograd saved for the backward) and
per-client caps on count and bytes; past a bound the least recently used session
goes first. A missing session is not an error for the client: the VJP answers 410
and the client resends its inputs to be recomputed.

Example:
    >>> store = SessionStore(ttl_s=60, budget_bytes=2 << 30, per_client_sessions=64, per_client_bytes=1 << 30)
    >>> sid = store.put("alice", call, call.nbytes)
    >>> store.take("alice", sid) is call
    True
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from graytune.errors import AccessDeniedError


class SessionGone(LookupError):
    """The session expired, was evicted or never existed here (answered with 410)."""


@dataclass
class _Entry:
    client: str
    call: Any
    nbytes: int
    expires: float


class SessionStore:
    """Thread-safe LRU store of pending boundary calls."""

    def __init__(self, ttl_s: float, budget_bytes: int, per_client_sessions: int, per_client_bytes: int,
                 clock: Any = time.monotonic) -> None:
        self.ttl_s, self.budget_bytes = ttl_s, budget_bytes
        self.per_client_sessions, self.per_client_bytes = per_client_sessions, per_client_bytes
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0
        self.expired = 0

    def put(self, client: str, call: Any, nbytes: int) -> str | None:
        """Keep ``call`` for ``client``; ``None`` when it alone exceeds a cap (the VJP will recompute)."""
        if nbytes > min(self.budget_bytes, self.per_client_bytes):
            return None
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._expire()
            self._entries[sid] = _Entry(client, call, nbytes, self._clock() + self.ttl_s)
            self._shrink(client)
        return sid

    def peek(self, client: str, sid: str) -> Any:
        """The session's call, left in place; ``SessionGone`` or ``AccessDeniedError`` otherwise."""
        with self._lock:
            return self._find(client, sid).call

    def take(self, client: str, sid: str) -> Any:
        """Remove and return the session's call; ``SessionGone`` or ``AccessDeniedError`` otherwise."""
        with self._lock:
            entry = self._find(client, sid)
            del self._entries[sid]
            return entry.call

    def _find(self, client: str, sid: str) -> _Entry:
        self._expire()
        entry = self._entries.get(sid)
        if entry is None:
            raise SessionGone(sid)
        if entry.client != client:
            raise AccessDeniedError("a session made by another client", "its own client", client,
                                    "each client may only use the session ids it was given")
        return entry

    def release(self, client: str, sid: str) -> bool:
        """Drop a session the client will not differentiate; ``False`` if it is already gone."""
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

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"sessions": len(self._entries), "bytes": self._bytes(), "evicted": self.evicted,
                    "expired": self.expired}

    def _bytes(self, client: str | None = None) -> int:
        return sum(e.nbytes for e in self._entries.values() if client is None or e.client == client)

    def _expire(self) -> None:
        now = self._clock()
        for sid in [sid for sid, e in self._entries.items() if e.expires <= now]:
            del self._entries[sid]
            self.expired += 1

    def _shrink(self, client: str) -> None:
        def over_client() -> bool:
            mine = [e for e in self._entries.values() if e.client == client]
            return len(mine) > self.per_client_sessions or sum(e.nbytes for e in mine) > self.per_client_bytes

        while over_client():
            self._evict(next(sid for sid, e in self._entries.items() if e.client == client))
        while self._bytes() > self.budget_bytes:
            self._evict(next(iter(self._entries)))

    def _evict(self, sid: str) -> None:
        del self._entries[sid]
        self.evicted += 1
