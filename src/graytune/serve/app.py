"""The HTTP service: one hidden backbone lent to many clients at once (FastAPI).

Endpoints (all but ``/v1/health`` need ``Authorization: Bearer KEY``):

- ``GET /v1/spec?access=LEVEL`` the spec visible at ``LEVEL`` (at most the granted one);
- ``GET /v1/stats`` the caller's own sessions and quota use (every client's for an admin);
- ``POST /v1/tokenize`` ``{"texts": [...]}`` → the owner's token ids;
- ``POST /v1/forward`` a safetensors request → outputs, and a session id when gradients are wanted;
- ``POST /v1/vjp`` the outputs' gradients and a session id (or, after 410, the whole forward again)
  → the gradients at the client's tensors;
- ``POST /v1/sessions/release`` ``{"session": id}`` release a session the client will not differentiate
  (``DELETE /v1/sessions/{id}`` still works for older clients, but puts the id in URLs and logs);
- ``/v1/adapters/...`` hosted adapters (see ``graytune.serve.adapters``).

Messages follow ``graytune.access.wire`` (its version answers on ``/v1/spec`` as
``protocol``); a request in a newer protocol than this server's gets a 400 that says so.

Every request is checked before any compute: key, body size and read deadline, wire format,
the work it asks for (``graytune.serve.admission``), dtypes, shapes against the spec, finite
values, level and quotas. Errors come back as ``{"error": kind, "detail": message}`` with a
4xx (503/504 when busy or past the deadline) and never a stack trace. Health, spec, stats and
releases run on the event loop and never wait for the backbone (see ``graytune.serve.service``).

Example:
    >>> app = create_app(graytune.open_backbone("minilm", "dark-gray"), ServeConfig(), ApiKeys({"me": KEY}))
    >>> uvicorn.run(app, host="127.0.0.1", port=8470)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from graytune.access import BoundaryCall, LocalHandle, texts_of
from graytune.access.owner import DeadlineExceeded
from graytune.access.wire import (
    ProtocolError, check_request_protocol, encode, pack_result, pack_vjp, read_request, request_key, server_protocol,
)
from graytune.errors import AccessDeniedError, GraytuneError, InvalidInputError, NumericalError, UnknownNameError
from graytune.serve.admission import HTTPProblem, check_texts
from graytune.serve.config import ApiKeys, ServeConfig
from graytune.serve.ledger import QuotaExceeded
from graytune.serve.service import Service, rows_of, timed_out

__all__ = ["WIRE_MEDIA", "HTTPProblem", "Service", "answer", "create_app"]
log = logging.getLogger(__name__)
WIRE_MEDIA = "application/vnd.graytune.safetensors"


def create_app(handle: LocalHandle, config: ServeConfig, keys: ApiKeys, extra: Callable[[FastAPI, Service], None]
               | None = None) -> FastAPI:
    """The FastAPI app lending ``handle``'s backbone at ``config.access``; ``extra`` adds routes (adapters)."""
    service = Service(handle, config, keys)
    app = FastAPI(title="graytune", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_lifespan)
    app.state.service = service
    app.state.on_close = [service.close]  # what to stop when the app shuts down (e.g. the adapter batcher)
    _install_errors(app)

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/v1/spec")
    async def spec(request: Request, access: str | None = None) -> dict[str, Any]:
        service.client(request)
        return {**service.spec(access), **server_protocol()}

    @app.get("/v1/stats")
    async def stats(request: Request) -> dict[str, Any]:
        return service.stats(service.client(request))

    @app.post("/v1/tokenize")
    async def tokenize(request: Request) -> Response:
        service.client(request)
        async with service.body(request) as body:
            texts = await service.checked(_tokenize_texts, body, config)
            ids = await service.checked(service.handle.tokenize, texts)
        return Response(encode(ids), media_type=WIRE_MEDIA)

    @app.post("/v1/forward")
    async def forward(request: Request) -> Response:
        client = service.client(request)
        until = service.deadline()
        async with service.body(request) as body:
            message = await service.checked(read_request, body)
            handle, plan = await service.checked(service.plan, client, message)
            rows = rows_of(plan)
            await service.checked(service.ledger.charge, client, rows)

            def run() -> tuple[tuple[torch.Tensor, ...], BoundaryCall]:
                call = handle.open_call(plan, measure=True)
                return call.forward([plan.tensor(g, p) for g, p in plan.slots]), call

            try:
                values, call = await service.compute(run, until)
            except BaseException:
                await service.refund(client, samples=rows)
                raise
        session = service.store.put(client, call, call.nbytes, request_key(message)) if call.differentiable else None
        return Response(pack_result(plan, values, call.values_read, session), media_type=WIRE_MEDIA)

    @app.post("/v1/vjp")
    async def vjp(request: Request) -> Response:
        client = service.client(request)
        until = service.deadline()
        async with service.body(request) as body:
            message = await service.checked(read_request, body)
            call, grads, rows = await service.checked(service.vjp_call, client, message)

            def run() -> tuple[torch.Tensor | None, ...]:
                if not call.output_shapes:  # a recompute: the forward again, then the shapes are known
                    call.forward([call.plan.tensor(g, p) for g, p in call.plan.slots])
                    call.check_grads(grads)
                return call.vjp(grads)

            try:
                result = await service.compute(run, until)
            except BaseException:
                await service.refund(client, grad_rows=rows)
                raise
        return Response(pack_vjp(call.plan, result), media_type=WIRE_MEDIA)

    @app.post("/v1/sessions/release")
    async def release(request: Request) -> dict[str, bool]:
        client = service.client(request)
        async with service.body(request) as body:
            payload = await service.checked(_json, body)
        session = payload.get("session") if isinstance(payload, dict) else None
        if not isinstance(session, str):
            raise InvalidInputError('send {"session": "<the id the forward answered with>"}')
        return {"released": service.store.release(client, session)}

    @app.delete("/v1/sessions/{session}")
    async def release_by_url(session: str, request: Request) -> dict[str, bool]:
        return {"released": service.store.release(service.client(request), session)}

    if extra is not None:
        extra(app, service)
    return app


def _tokenize_texts(body: bytes, config: ServeConfig) -> list[str]:
    payload = _json(body)
    if isinstance(payload, dict):
        check_request_protocol(payload)
    texts = payload.get("texts") if isinstance(payload, dict) else None
    if isinstance(texts, list):
        check_texts([t for t in texts if isinstance(t, str)], config)
    return texts_of(texts)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Service = app.state.service
    every = min(5.0, max(0.05, service.config.session_ttl_s / 4))

    async def sweep() -> None:  # expiry on a timer: an idle server frees abandoned graphs too
        while True:
            await asyncio.sleep(every)
            service.store.sweep()

    sweeper = asyncio.get_running_loop().create_task(sweep())
    try:
        yield
    finally:
        sweeper.cancel()
        for close in reversed(app.state.on_close):
            close()


def _json(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidInputError("the body must be JSON, e.g. {\"texts\": [\"a cat\"]}") from None
    except RecursionError:
        raise InvalidInputError("the body nests JSON too deeply; send e.g. {\"texts\": [\"a cat\"]}") from None


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


def answer(problem: HTTPProblem) -> JSONResponse:
    """The response for ``problem``: ``{"error", "detail"}`` with its status and headers."""
    return JSONResponse({"error": problem.kind, "detail": problem.detail}, status_code=problem.status,
                        headers=problem.headers)


def _install_errors(app: FastAPI) -> None:
    def plain(status: int, kind: str, detail: str) -> JSONResponse:
        return answer(HTTPProblem(status, kind, detail))

    @app.exception_handler(HTTPProblem)
    async def problem(_: Request, err: HTTPProblem) -> JSONResponse:
        return answer(err)

    @app.exception_handler(ProtocolError)
    async def protocol(_: Request, err: ProtocolError) -> JSONResponse:
        return plain(400, "protocol", str(err))

    @app.exception_handler(QuotaExceeded)
    async def quota(_: Request, err: QuotaExceeded) -> JSONResponse:
        return plain(429, "quota", str(err))

    @app.exception_handler(DeadlineExceeded)
    async def deadline(_: Request, err: DeadlineExceeded) -> JSONResponse:
        return answer(timed_out(app.state.service.config.request_timeout_s))

    @app.exception_handler(GraytuneError)
    async def graytune_error(_: Request, err: GraytuneError) -> JSONResponse:
        if isinstance(err, AccessDeniedError):
            return plain(403, "access_denied", str(err))
        if isinstance(err, NumericalError):  # the owner's precision, not the client's input
            return plain(500, "numerical", str(err))
        kind = "unknown_name" if isinstance(err, UnknownNameError) else "invalid_input"
        return plain(400, kind, str(err))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:
        log.error("unexpected error while serving a request: %s", type(err).__name__, exc_info=err)
        return plain(500, "internal", "the server failed on this request; the owner can find it in the log")
