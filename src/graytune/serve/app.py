"""The HTTP service: one hidden backbone lent to many clients at once (FastAPI).

Endpoints (all but ``/v1/health``, ``/docs`` and ``/openapi.json`` need ``Authorization: Bearer KEY``;
docs/http-api.md is the reference, ``/docs`` the OpenAPI page):

- ``GET /v1/spec?access=LEVEL`` the spec visible at ``LEVEL`` (at most the granted one);
- ``GET /v1/stats`` the caller's own sessions and quota use (every client's for an admin);
- ``GET /v1/check-port?name=PORT&op=add&grad=true`` whether an edit at a port is allowed at the caller's level;
- ``POST /v1/tokenize`` ``{"texts": [...]}`` (JSON bounded by size and structure) → the owner's token ids;
- ``POST /v1/forward`` a safetensors request → outputs, and a session id when gradients are wanted;
- ``POST /v1/vjp`` the outputs' gradients and a session id (or, after 410, the whole forward again)
  → the gradients at the client's tensors;
- ``POST /v1/generate`` a language model's prompt, edits, token maps and settings → the tokens it generates
  (streamed as newline-delimited JSON with ``stream``);
- ``POST /v1/generate-images`` a diffusion model's prompts, edits and settings → the images the owner samples;
- ``POST /v1/sessions/release`` ``{"session": id}`` release a session the client will not differentiate
  (``DELETE /v1/sessions/{id}`` still works for older clients, but puts the id in URLs and logs);
- ``/v1/adapters/...`` hosted adapters (see ``graytune.serve.routes.hosted``).

The routes live in ``graytune.serve.routes`` (``info``, ``boundary``, ``hosted``), the error bodies in
``graytune.serve.responses``; this module puts them together around one ``Service``.

Messages follow ``graytune.access.wire`` (its version answers on ``/v1/spec`` as
``protocol``); a request in a newer protocol than this server's gets a 400 that says so.

Every request is checked before any compute: key, body size and read deadline, wire format,
the work it asks for (``graytune.serve.admission``), dtypes, shapes against the spec, finite
values, level, black-box edits (``graytune.serve.edits``) and quotas. Errors come back as ``{"error": kind, "detail": message}`` with a
4xx (503/504 when busy or past the deadline) and never a stack trace; each is logged by client name
(``graytune.serve.requestlog``). Health, spec, stats and
releases run on the event loop and never wait for the backbone (see ``graytune.serve.service``).

Example:
    >>> app = create_app(graytune.open_backbone("minilm", "dark-gray"), ServeConfig(), ApiKeys({"me": KEY}))
    >>> uvicorn.run(app, host="127.0.0.1", port=8470)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from graytune.access import LocalHandle
from graytune.serve.admission import HTTPProblem
from graytune.serve.coalesce import Joiner
from graytune.serve.config import ApiKeys, ServeConfig
from graytune.serve.requestlog import RequestLog
from graytune.serve.responses import WIRE_MEDIA, answer, install_error_handlers
from graytune.serve.routes import boundary, info
from graytune.serve.service import Service

__all__ = ["WIRE_MEDIA", "HTTPProblem", "Service", "answer", "create_app"]


def create_app(handle: LocalHandle, config: ServeConfig, keys: ApiKeys, extra: Callable[[FastAPI, Service], None]
               | None = None) -> FastAPI:
    """The FastAPI app lending ``handle``'s backbone at ``config.access``; ``extra`` adds routes (adapters)."""
    service = Service(handle, config, keys)
    if config.coalesce_ms > 0:
        service.joiner = Joiner(service, config.coalesce_ms, config.coalesce_max_rows)
    app = FastAPI(title="graytune backbone server", version=graytune_version(), description=_DESCRIPTION,
                  docs_url="/docs", redoc_url=None, openapi_url="/openapi.json", lifespan=_lifespan)
    app.state.service = service
    app.state.on_close = [service.close]  # what to stop when the app shuts down (e.g. the adapter batcher)
    app.state.on_start = []  # what to call with the server's URL once it listens (e.g. the fine-tuning job queue)
    install_error_handlers(app)
    app.add_middleware(RequestLog, verify=keys.client)  # refused and failed requests, by client name
    app.include_router(info.router)
    app.include_router(boundary.router)
    if extra is not None:
        extra(app, service)
    return app


_DESCRIPTION = ("A hidden backbone lent at a level (black-box, dark-gray, light-gray): forward, VJP, tokenize, "
                "hosted adapters. Every route but /v1/health, /docs and /openapi.json needs Authorization: Bearer "
                "KEY. Tensors travel as graytune safetensors messages (graytune.access.wire); docs/http-api.md is "
                "the full reference, with every request, answer and error.")


def graytune_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("graytune")
    except PackageNotFoundError:
        return "0"


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Service = app.state.service
    every = min(5.0, max(0.05, service.config.session_ttl_s / 4))

    async def sweep() -> None:  # expiry on a timer: an idle server frees abandoned graphs too
        while True:
            await asyncio.sleep(every)
            service.store.sweep()
            await service.return_memory()

    sweeper = asyncio.get_running_loop().create_task(sweep())
    try:
        yield
    finally:
        sweeper.cancel()
        for close in reversed(app.state.on_close):
            close()


class _RedactSessions(logging.Filter):
    """Access-log lines of ``DELETE /v1/sessions/<id>`` (older clients) without the id."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and str(args[2]).startswith("/v1/sessions/"):
            record.args = (*args[:2], "/v1/sessions/<redacted>", *args[3:])
        return True


_access_log = logging.getLogger("uvicorn.access")
if not any(isinstance(f, _RedactSessions) for f in _access_log.filters):
    _access_log.addFilter(_RedactSessions())
