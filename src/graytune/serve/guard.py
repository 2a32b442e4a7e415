"""Slow and idle connections cannot starve anyone: header deadlines, per-address and global caps (uvicorn).

uvicorn bounds idle keep-alive time and the number of connections, but not how long a
connection may take to send a request's headers, nor how many one address may hold
open: 1,000 connections that send half a header and stall fill its
``limit_concurrency`` and every request gets 503. ``guarded_protocol`` is uvicorn's own
h11 protocol with these additions, all about connections that are *waiting* (just opened,
or idle between requests: not inside a request):

- a waiting connection must send a complete request head within ``header_timeout_s`` or it is
  closed; while more than half the global cap waits (an attack, or a storm), a connection
  starts waiting with a shorter deadline (``pressure_timeout_s``, at most 2 s);
- one address holds at most ``per_address`` waiting connections: when another arrives, its
  oldest is closed;
- all addresses together hold at most ``max_waiting`` (``max_connections`` less a reserve
  of an eighth for requests being served): past it, the oldest waiting connection of the
  address holding the most goes, and connections that have never carried a valid API key
  go before those that have (a client's idle keep-alive connections outlast a flood).
  Stalled connections from many addresses therefore cannot reach uvicorn's cap: 2,176 of
  them from 34 loopback addresses used to make 72 of 75 authenticated requests answer 503.

A client that is sending a request is never closed for this. The body's deadline is the app's
(``--body-timeout-s``, 408). On a network, put a reverse proxy in front as well (see
docs/reliability.md).

Example:
    >>> uvicorn.run(app, http=guarded_protocol(ServeConfig(), keys.client))
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

#: a function naming the client of an ``Authorization`` header value, or ``None`` (``ApiKeys.client``)
Verify = Callable[[str | None], str | None]


class _Waiting:
    """The waiting connections of one server: per address, those never authenticated and those that were."""

    def __init__(self) -> None:
        self.by_address: dict[str, tuple[OrderedDict[Any, None], OrderedDict[Any, None]]] = {}
        self.total = 0

    def add(self, conn: GuardedProtocol) -> None:
        fresh, proven = self.by_address.setdefault(conn.address, (OrderedDict(), OrderedDict()))
        (proven if conn.proven else fresh)[conn] = None
        self.total += 1

    def remove(self, conn: GuardedProtocol) -> None:
        queues = self.by_address.get(conn.address)
        if queues is None:
            return
        for queue in queues:
            if conn in queue:
                del queue[conn]
                self.total -= 1
        if not queues[0] and not queues[1]:
            del self.by_address[conn.address]

    def oldest_of(self, address: str) -> GuardedProtocol | None:
        fresh, proven = self.by_address.get(address, ({}, {}))
        return next(iter(fresh), None) or next(iter(proven), None)

    def count(self, address: str) -> int:
        fresh, proven = self.by_address.get(address, ({}, {}))
        return len(fresh) + len(proven)

    def victim(self) -> GuardedProtocol | None:
        """The connection to shed past the global cap: never-authenticated first, from the address holding most."""
        if not self.by_address:
            return None
        for index in (0, 1):
            address, queues = max(self.by_address.items(), key=lambda item: len(item[1][index]))
            if queues[index]:
                return next(iter(queues[index]))
        return None


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with request-head deadlines and per-address and global caps on waiting connections."""

    header_timeout_s: float = 10.0
    per_address: int = 64
    max_waiting: int = 1792
    verify: Verify | None = None
    registry: _Waiting = _Waiting()  # one per server (``guarded_protocol`` makes a class per server)

    @property
    def pressure_timeout_s(self) -> float:
        return max(0.5, min(self.header_timeout_s, 2.0))

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._timer: asyncio.TimerHandle | None = None
        self.proven, self._listed = False, False
        super().connection_made(transport)
        self.address = self.client[0] if self.client else "-"
        self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not None and self.cycle is not before:  # a request head arrived
            self._stop_waiting()
            if not self.proven and self.verify is not None:
                header = dict(self.headers or []).get(b"authorization", b"")
                self.proven = self.verify(header.decode("latin-1")) is not None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._wait_for_head()

    def _wait_for_head(self) -> None:
        registry = self.registry
        if self._listed:
            registry.remove(self)
        registry.add(self)
        self._listed = True
        while registry.count(self.address) > max(1, self.per_address):
            oldest = registry.oldest_of(self.address)
            if oldest is None:
                break
            oldest._drop()
        while registry.total > max(1, self.max_waiting):
            victim = registry.victim()
            if victim is None:
                break
            victim._drop()
        if self.transport.is_closing():  # this very connection was the one to shed
            return
        if self._timer is not None:
            self._timer.cancel()
        pressed = registry.total > self.max_waiting // 2
        self._timer = self.loop.call_later(self.pressure_timeout_s if pressed else self.header_timeout_s, self._drop)

    def _stop_waiting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._listed:
            self.registry.remove(self)
            self._listed = False

    def _drop(self) -> None:
        self._stop_waiting()
        if not self.transport.is_closing():
            self.transport.close()


def _limits(config: Any) -> dict[str, Any]:
    reserve = max(4, config.max_connections // 8)  # room for requests being served
    return {"header_timeout_s": config.header_timeout_s, "per_address": config.connections_per_address,
            "max_waiting": max(1, config.max_connections - reserve)}


def guarded_protocol(config: Any, verify: Verify | None = None) -> type[GuardedProtocol]:
    """A ``GuardedProtocol`` class with a ``ServeConfig``'s limits and its own registry (one per server).

    ``verify`` names the client of an ``Authorization`` header (``ApiKeys.client``): connections that carried
    a valid key are shed last.
    """
    return type("GuardedProtocol", (GuardedProtocol,), {**_limits(config), "verify": staticmethod(verify) if verify
                                                        else None, "registry": _Waiting()})


def configure(config: Any, verify: Verify | None = None) -> None:
    """Set the limits of ``GuardedProtocol`` itself (worker processes, which uvicorn starts by import path)."""
    for name, value in _limits(config).items():
        setattr(GuardedProtocol, name, value)
    GuardedProtocol.verify = staticmethod(verify) if verify else None  # type: ignore[assignment]


def uvicorn_options(config: Any, importable: bool = False, verify: Verify | None = None) -> dict[str, Any]:
    """uvicorn settings for a ``ServeConfig``: the guarded protocol, keep-alive and the connection cap.

    With ``importable`` the protocol is named by import path (for ``workers > 1``; call ``configure`` there).
    """
    http: Any = "graytune.serve.guard:GuardedProtocol" if importable else guarded_protocol(config, verify)
    return {"http": http, "timeout_keep_alive": config.keep_alive_s, "limit_concurrency": config.max_connections}
