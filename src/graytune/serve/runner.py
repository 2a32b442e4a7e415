"""Running the service: in this process on a thread (tests, benchmarks) or as ``graytune serve``.

Example:
    >>> with BackgroundServer(app) as url:       # a free port on 127.0.0.1
    ...     h = graytune.open_backbone(url, api_key=KEY)
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import uvicorn

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
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


ENV_VAR = "GRAYTUNE_SERVE"


def build_app(backbone_id: str, config: ServeConfig, keys: ApiKeys) -> Any:
    """The service for a backbone id, with the adapters named in ``config.adapters`` hosted."""
    from graytune.access import LocalHandle, open_backbone
    from graytune.serve.routes.hosted import install_adapters

    if backbone_id.startswith(("http://", "https://")):
        raise InvalidInputError("graytune serve lends a backbone it holds; give a local id such as minilm")
    handle = open_backbone(backbone_id, config.access, reads=config.reads, device=config.device, dtype=config.dtype,
                           recompute=config.recompute)
    assert isinstance(handle, LocalHandle)
    return create_app(handle, config, keys, extra=install_adapters if config.adapters else None)


def app_from_env() -> Any:
    """uvicorn's factory for worker processes: the app described by ``$GRAYTUNE_SERVE`` (JSON)."""
    settings = json.loads(os.environ[ENV_VAR])
    config = ServeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings["config"].items()})
    tame_allocator(config.malloc_arenas, config.malloc_mmap_kb)
    keys = ApiKeys.load(settings["keys"])
    configure(config, keys.client)
    return build_app(settings["backbone"], config, keys)


def serve_forever(backbone_id: str, config: ServeConfig, keys_file: str) -> None:
    """Run the service in the foreground (``graytune serve``); workers share the quota ledger, not sessions.

    The allocator is bounded first (``graytune.serve.memory``), before the backbone loads and threads start.
    """
    tame_allocator(config.malloc_arenas, config.malloc_mmap_kb)
    keys = ApiKeys.load(keys_file)
    options = dict(host=config.host, port=config.port, log_level="info",
                   **uvicorn_options(config, importable=config.workers > 1, verify=keys.client))
    if config.workers > 1:
        os.environ[ENV_VAR] = json.dumps({"backbone": backbone_id, "config": asdict(config),
                                          "keys": str(Path(keys_file).resolve())})
        uvicorn.run("graytune.serve.runner:app_from_env", factory=True, workers=config.workers, **options)
    else:
        uvicorn.run(build_app(backbone_id, config, keys), **options)
