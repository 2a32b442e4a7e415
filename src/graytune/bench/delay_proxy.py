"""A TCP proxy on loopback that delays every byte by a fixed one-way time: a slow link, simulated.

Bytes keep their order and are not rate-limited (a long fat link: latency, no bandwidth cap); a new
connection costs one round trip before its first byte goes on, as a TCP handshake over the link would.
Stdlib only (asyncio on a thread of its own), so benchmarks and tests share it.

Example:
    >>> with DelayProxy("http://127.0.0.1:8470", one_way_s=0.025) as url:   # 50 ms round trip
    ...     h = graytune.open_backbone(url, "dark-gray", api_key=KEY)
"""

from __future__ import annotations

import asyncio
import threading
import time
from urllib.parse import urlsplit

from graytune.errors import InvalidInputError

__all__ = ["DelayProxy"]
_CHUNK = 1 << 16


class DelayProxy:
    """Forwards ``127.0.0.1:<free port>`` to ``target`` with ``one_way_s`` added each way.

    Args:
        target: where to forward, ``http://host:port`` or ``host:port``.
        one_way_s: the delay each way, in seconds (a round trip costs twice this).
    """

    def __init__(self, target: str, one_way_s: float = 0.025) -> None:
        parts = urlsplit(target if "//" in target else f"//{target}")
        if parts.hostname is None or parts.port is None:
            raise InvalidInputError(f"DelayProxy needs a target as http://host:port; got {target!r}")
        if one_way_s < 0:
            raise InvalidInputError(f"one_way_s must be >= 0 seconds; got {one_way_s}")
        self.target, self.one_way_s = (parts.hostname, parts.port), float(one_way_s)
        self.scheme = parts.scheme or "http"
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="graytune-delay-proxy")
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> str:
        """Start serving; the proxy's URL (same scheme as the target's)."""
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._connection, "127.0.0.1", 0), self._loop).result(10)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.url = f"{self.scheme}://{host}:{port}"
        return self.url

    def stop(self) -> None:
        """Close the listening socket and every relayed connection, then the loop's thread."""
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            await asyncio.sleep(2 * self.one_way_s)  # the handshake's round trip
            up_reader, upstream = await asyncio.open_connection(*self.target)
            await asyncio.gather(self._pipe(reader, upstream), self._pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for end in (writer, upstream):
                if end is not None:
                    end.close()
            self._tasks.discard(task)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Copy ``source`` to ``sink``, each chunk delivered ``one_way_s`` after it was read, in order."""
        pending: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await pending.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    if sink.can_write_eof():
                        sink.write_eof()
                    return
                sink.write(data)
                await sink.drain()

        delivery = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await source.read(_CHUNK)
                pending.put_nowait((time.monotonic() + self.one_way_s, data))
                if not data:
                    break
            await delivery
        finally:
            delivery.cancel()
