"""Running the service: in this process on a thread (tests, benchmarks) or as ``graytune serve``.

Example:
    >>> with BackgroundServer(app) as url:       # a free port on 127.0.0.1
    ...     h = graytune.open_backbone(url, api_key=KEY)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from graytune.devices import dtype_name
from graytune.errors import InvalidInputError, RemoteError
from graytune.serve.app import create_app
from graytune.serve.config import ApiKeys, ServeConfig
from graytune.serve.guard import configure, uvicorn_options
from graytune.serve.memory import tame_allocator


class BackgroundServer:
    """uvicorn serving ``app`` on a daemon thread; the URL once it accepts connections.

    An app made by ``create_app`` is served with its own connection limits (``guard.uvicorn_options``).
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        service = getattr(getattr(app, "state", None), "service", None)
        if service is not None:
            options = {**uvicorn_options(service.config, verify=service.keys.client), **options}
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", **options)
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
        for begin in getattr(getattr(self.server.config.app, "state", None), "on_start", ()):
            begin(self.url)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


ENV_VAR = "GRAYTUNE_SERVE"
#: seconds a worker may leave uvicorn's supervisor ping unanswered before it is killed and restarted; uvicorn's
#: 5 s killed a worker still loading its backbone on a loaded 2-core machine
WORKER_HEALTHCHECK_S = 60


def build_app(backbone_id: str, config: ServeConfig, keys: ApiKeys,
              extra: Callable[[Any, Any], None] | None = None) -> Any:
    """The service for a backbone id, with the adapters named in ``config.adapters`` hosted; ``extra(app,
    service)`` adds more routes (``graytune serve --jobs``: the fine-tuning job routes)."""
    from graytune.access import LocalHandle, open_backbone
    from graytune.serve.routes.hosted import install_adapters

    if backbone_id.startswith(("http://", "https://")):
        raise InvalidInputError("graytune serve lends a backbone it holds; give a local id such as minilm")
    handle = open_backbone(backbone_id, config.access, reads=config.reads, device=config.device, dtype=config.dtype,
                           recompute=config.recompute, top_k=config.grant_topk)
    assert isinstance(handle, LocalHandle)

    def install(app: Any, service: Any) -> None:
        if config.adapters:
            install_adapters(app, service)
        if extra is not None:
            extra(app, service)

    return create_app(handle, config, keys, extra=install)


def app_from_env() -> Any:
    """uvicorn's factory for worker processes: the app described by ``$GRAYTUNE_SERVE`` (JSON)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = json.loads(os.environ[ENV_VAR])
    config = ServeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings["config"].items()})
    tame_allocator(config.malloc_arenas, config.malloc_mmap_kb)
    keys = ApiKeys.load(settings["keys"], check_mode=False)  # the parent warned about the file's mode
    configure(config, keys.client)
    return build_app(settings["backbone"], config, keys)


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port``; a taken port or an unknown host raises an error that says what to do."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise InvalidInputError(f"cannot listen on {host}:{port} ({reason}); stop what holds that "
                                "port, or choose another with --port (or another interface with --host)") from None
    sock.set_inheritable(True)  # worker processes serve on it too
    return sock


@dataclass
class Started:
    """A service ready to run: its port bound, its app built and every option checked (``start``)."""

    backbone_id: str
    config: ServeConfig
    keys: ApiKeys
    sock: socket.socket
    app: Any  # the app to serve; ``None`` with workers, which build their own
    device: str  # where the backbone runs, resolved (``cpu``, ``cuda:0``)
    dtype: str  # its precision (``fp32``, ``bf16``, ``fp16``)

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def start(backbone_id: str, config: ServeConfig, keys: ApiKeys,
          extra: Callable[[Any, Any], None] | None = None) -> Started:
    """Bind the port, then build the service, checking every option, for ``serve_forever``.

    The allocator is bounded first (``graytune.serve.memory``), before the backbone loads and threads start.
    With several workers the app is built here once to check the options, then let go: each worker builds its own.
    """
    sock = listen(config.host, config.port)
    try:
        tame_allocator(config.malloc_arenas, config.malloc_mmap_kb)
        app = build_app(backbone_id, config, keys, extra)
        handle = app.state.service.handle
        device, dtype = str(handle.device), dtype_name(handle.dtype)
        if config.workers > 1:
            for close in reversed(app.state.on_close):
                close()
            app = None
    except BaseException:
        sock.close()
        raise
    return Started(backbone_id, config, keys, sock, app, device, dtype)


def serve_forever(started: Started, access_log: bool = False) -> None:
    """Run a started service in the foreground (``graytune serve``); workers share the quota ledger, not sessions.

    ``access_log`` logs every request (uvicorn's log, ``graytune -v serve``); refused and failed requests are
    logged either way (``graytune.serve.requestlog``).
    """
    config, keys = started.config, started.keys
    options = dict(log_level="info" if access_log else "warning",
                   **uvicorn_options(config, importable=config.workers > 1, verify=keys.client))
    if config.workers > 1:
        assert keys.source is not None, "workers read the key file"
        os.environ[ENV_VAR] = json.dumps({"backbone": started.backbone_id, "config": asdict(config),
                                          "keys": str(keys.source)})
        settings = uvicorn.Config("graytune.serve.runner:app_from_env", factory=True, workers=config.workers,
                                  timeout_worker_healthcheck=WORKER_HEALTHCHECK_S, **options)
        Multiprocess(settings, sockets=[started.sock]).run()
    else:
        for begin in started.app.state.on_start:  # the socket listens already: what they start can connect
            begin(started.url)
        server = uvicorn.Server(uvicorn.Config(started.app, **options))
        server.run(sockets=[started.sock])
        if not server.started:
            raise RemoteError(0, "start", "the server did not start; its log above says why")
