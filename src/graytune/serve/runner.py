"""Running the service: in this process on a thread (tests, benchmarks) or as ``graytune serve``.

Example:
    >>> with BackgroundServer(app) as url:       # a free port on 127.0.0.1
    ...     h = graytune.open_backbone(url, api_key=KEY)
"""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn

from graytune.errors import RemoteError


class BackgroundServer:
    """uvicorn serving ``app`` on a daemon thread; the URL once it accepts connections."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off", **options)
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # not the main thread
        self._thread = threading.Thread(target=self.server.run, daemon=True, name="graytune-serve")
        self.url = ""

    def start(self, timeout_s: float = 30.0) -> str:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RemoteError(0, "start", "the server did not start (is the port taken?)")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
