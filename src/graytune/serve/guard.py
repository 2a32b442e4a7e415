"""Slow and idle connections cannot starve anyone: a header deadline and a per-address cap (uvicorn).

uvicorn bounds idle keep-alive time and the number of connections, but not how long a
connection may take to send a request's headers, nor how many one address may hold
open: 1,000 connections that send half a header and stall fill its
``limit_concurrency`` and every request gets 503. ``guarded_protocol`` is uvicorn's own
h11 protocol with two additions:

- a connection that is not inside a request (just opened, or idle between requests) must
  send a complete request head within ``header_timeout_s`` or it is closed;
- one address holds at most ``per_address`` such connections: when another arrives, the
  oldest is closed. A client that is sending a request is never closed for this, so a
  flood of stalled connections from one address costs its sender its own oldest ones.

The body's deadline is the app's (``--body-timeout-s``, 408). On a network, put a reverse
proxy in front as well (see docs/reliability.md).

Example:
    >>> uvicorn.run(app, http=guarded_protocol(header_timeout_s=10, per_address=64))
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and a per-address cap on waiting connections."""

    header_timeout_s: float = 10.0
    per_address: int = 64
    waiting: dict[str, OrderedDict[GuardedProtocol, None]] = {}  # per address, oldest first (one server)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not None and self.cycle is not before:  # a request head arrived
            self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._wait_for_head()

    def _wait_for_head(self) -> None:
        queue = self.waiting.setdefault(self._address(), OrderedDict())
        queue[self] = None
        while len(queue) > max(1, self.per_address):
            oldest, _ = queue.popitem(last=False)
            oldest._drop()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(self.header_timeout_s, self._drop)

    def _stop_waiting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queue = self.waiting.get(self._address())
        if queue is not None:
            queue.pop(self, None)
            if not queue:
                del self.waiting[self._address()]

    def _drop(self) -> None:
        self._stop_waiting()
        if not self.transport.is_closing():
            self.transport.close()

    def _address(self) -> str:
        return self.client[0] if self.client else "-"


def guarded_protocol(header_timeout_s: float, per_address: int) -> type[GuardedProtocol]:
    """A ``GuardedProtocol`` class with these limits and its own registry (one per server in a process)."""
    return type("GuardedProtocol", (GuardedProtocol,), {"header_timeout_s": header_timeout_s,
                                                         "per_address": per_address, "waiting": {}})


def configure(header_timeout_s: float, per_address: int) -> None:
    """Set the limits of ``GuardedProtocol`` itself (worker processes, which uvicorn starts by import path)."""
    GuardedProtocol.header_timeout_s, GuardedProtocol.per_address = header_timeout_s, per_address


def uvicorn_options(config: Any, importable: bool = False) -> dict[str, Any]:
    """uvicorn settings for a ``ServeConfig``: the guarded protocol, keep-alive and the connection cap.

    With ``importable`` the protocol is named by import path (for ``workers > 1``; call ``configure`` there).
    """
    http: Any = "graytune.serve.guard:GuardedProtocol" if importable else guarded_protocol(
        config.header_timeout_s, config.connections_per_address)
    return {"http": http, "timeout_keep_alive": config.keep_alive_s, "limit_concurrency": config.max_connections}
