"""The HTTP service: one hidden backbone lent to many clients at once (FastAPI).

Endpoints (all but ``/v1/health`` need ``Authorization: Bearer KEY``):

- ``GET /v1/spec?access=LEVEL`` the spec visible at ``LEVEL`` (at most the granted one);
- ``POST /v1/tokenize`` ``{"texts": [...]}`` → the owner's token ids;
- ``POST /v1/forward`` a safetensors request → outputs, and a session id when gradients are wanted;
- ``POST /v1/vjp`` the outputs' gradients and a session id (or, after 410, the whole forward again)
  → the gradients at the client's tensors;
- ``DELETE /v1/sessions/{id}`` release a session the client will not differentiate;
- ``/v1/adapters/...`` hosted adapters (see ``graytune.serve.adapters``).

Messages follow ``graytune.access.wire`` (its version answers on ``/v1/spec`` as
``protocol``); a request in a newer protocol than this server's gets a 400 that says so.

Every request is checked before any compute: key, body size, wire format, dtypes,
shapes against the spec, finite values, level and quotas. Errors come back as
``{"error": kind, "detail": message}`` with a 4xx and never a stack trace.

Example:
    >>> app = create_app(graytune.open_backbone("minilm", "dark-gray"), ServeConfig(), ApiKeys({"me": KEY}))
    >>> uvicorn.run(app, host="127.0.0.1", port=8470)
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio
import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from graytune.access import BoundaryCall, CallPlan, LocalHandle, texts_of
from graytune.access.wire import (
    Message, ProtocolError, VjpRequest, check_request_protocol, encode, pack_result, pack_vjp, read_request,
    server_protocol, unpack_call, unpack_grads,
)
from graytune.errors import AccessDeniedError, GraytuneError, InvalidInputError, UnknownNameError
from graytune.serve.config import ApiKeys, Quotas, QuotaExceeded, ServeConfig
from graytune.serve.sessions import SessionGone, SessionStore
from graytune.types import AccessLevel

log = logging.getLogger(__name__)
T = TypeVar("T")
WIRE_MEDIA = "application/vnd.graytune.safetensors"


class HTTPProblem(Exception):
    """An answer other than 200, with a short public message."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


class Service:
    """The owner's side: the handle at each level, the session store, quotas and the compute lock."""

    def __init__(self, handle: LocalHandle, config: ServeConfig, keys: ApiKeys) -> None:
        granted = AccessLevel.parse(config.access)
        if granted >= AccessLevel.WHITE_BOX or handle.access >= AccessLevel.WHITE_BOX:
            raise InvalidInputError("white-box access never crosses the network; serve at black-box, "
                                    "dark-gray or light-gray and share weights another way if you mean to")
        self.handle = handle.at_level(granted) if granted < handle.access else handle
        self.granted, self.config, self.keys = self.handle.access, config, keys
        self._levels = {level: self.handle.at_level(level) for level in AccessLevel if level <= self.granted}
        self.store = SessionStore(config.session_ttl_s, int(config.session_budget_mb * 2**20),
                                  config.client_sessions, int(config.client_session_mb * 2**20))
        self.quotas = Quotas(config.quota_samples, config.quota_vjp)
        self.compute_lock = threading.Lock()
        self.max_body = int(config.max_body_mb * 2**20)

    def level_handle(self, label: object) -> LocalHandle:
        level = AccessLevel.parse(str(label)) if label else self.granted
        if level > self.granted:
            raise AccessDeniedError(f"a handle at {level.label}", level.label, self.granted.label,
                                    "this server lends the backbone at most at that level")
        return self._levels[level]

    def client(self, request: Request) -> str:
        name = self.keys.client(request.headers.get("authorization"))
        if name is None:
            raise HTTPProblem(401, "unauthorized", "a valid API key is needed: send 'Authorization: Bearer KEY'")
        return name

    async def body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            raise HTTPProblem(413, "too_large", f"request bodies are limited to {self.max_body} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise HTTPProblem(413, "too_large", f"request bodies are limited to {self.max_body} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        if declared is not None and len(body) != int(declared):
            raise HTTPProblem(400, "truncated", f"the body has {len(body)} bytes, Content-Length said {declared}")
        return body

    async def compute(self, work: Callable[[], T]) -> T:
        """Run ``work`` on a worker thread, one at a time on the backbone, within the request timeout."""
        deadline = time.monotonic() + 0.9 * self.config.request_timeout_s  # busy (503) before timed out (504)

        def locked() -> T:
            if not self.compute_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise HTTPProblem(503, "busy", "the backbone is busy; retry later")
            try:
                return work()
            finally:
                self.compute_lock.release()

        try:
            with anyio.fail_after(self.config.request_timeout_s):
                return await anyio.to_thread.run_sync(locked, abandon_on_cancel=True)
        except TimeoutError:
            raise HTTPProblem(504, "timeout", f"the request took over {self.config.request_timeout_s} s") from None

    def plan(self, client: str, message: Message) -> tuple[LocalHandle, CallPlan]:
        """The checked forward a request describes; quotas charged for its samples."""
        request = unpack_call(message)
        handle = self.level_handle(request.access)
        inputs: dict[str, Any] = dict(request.inputs)
        if request.texts is not None:
            inputs["text"] = self.texts(request.texts)
        plan = handle.plan(inputs, request.add, request.insert, request.outputs, request.reads)
        self.quotas.charge(client, samples=int(next(iter(plan.inputs.values())).shape[0]))
        return handle, plan

    def texts(self, texts: object) -> list[str]:
        texts = texts_of(texts)
        if len(texts) > self.config.max_texts:
            raise InvalidInputError(f"{len(texts)} strings in one request; at most {self.config.max_texts}")
        return texts


def create_app(handle: LocalHandle, config: ServeConfig, keys: ApiKeys, extra: Callable[[FastAPI, Service], None]
               | None = None) -> FastAPI:
    """The FastAPI app lending ``handle``'s backbone at ``config.access``; ``extra`` adds routes (adapters)."""
    service = Service(handle, config, keys)
    app = FastAPI(title="graytune", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_lifespan)
    app.state.service = service
    app.state.on_close = []  # what to stop when the app shuts down (e.g. the adapter batcher)
    _install_errors(app)

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/v1/spec")
    def spec(request: Request, access: str | None = None) -> dict[str, Any]:
        service.client(request)
        level = service.level_handle(access)
        return {"spec": level.spec.to_dict(), "access": level.access.label, "granted": service.granted.label,
                "reads": sorted(level.grants), "max_body_bytes": service.max_body, **server_protocol()}

    @app.get("/v1/stats")
    def stats(request: Request) -> dict[str, Any]:
        client = service.client(request)
        used = service.quotas.used.get(client, [0, 0])
        return {**service.store.stats(), "samples_used": used[0], "vjp_used": used[1]}

    @app.post("/v1/tokenize")
    async def tokenize(request: Request) -> Response:
        service.client(request)
        payload = _json(await service.body(request))
        if isinstance(payload, dict):
            check_request_protocol(payload)
        texts = service.texts(payload.get("texts") if isinstance(payload, dict) else None)
        ids = await service.compute(lambda: service.handle.tokenize(texts))
        return Response(encode(ids), media_type=WIRE_MEDIA)

    @app.post("/v1/forward")
    async def forward(request: Request) -> Response:
        client = service.client(request)
        handle, plan = service.plan(client, read_request(await service.body(request)))

        def run() -> tuple[tuple[torch.Tensor, ...], BoundaryCall]:
            call = handle.open_call(plan, measure=True)
            return call.forward([plan.tensor(g, p) for g, p in plan.slots]), call

        values, call = await service.compute(run)
        session = service.store.put(client, call, call.nbytes) if call.differentiable else None
        return Response(pack_result(plan, values, call.values_read, session), media_type=WIRE_MEDIA)

    @app.post("/v1/vjp")
    async def vjp(request: Request) -> Response:
        client = service.client(request)
        message = read_request(await service.body(request))
        service.quotas.charge(client, vjp=1)
        asked = unpack_grads(message)
        call = _vjp_call(service, client, message, asked)
        plan = call.plan

        def run() -> tuple[torch.Tensor | None, ...]:
            if asked.recompute:
                call.forward([plan.tensor(g, p) for g, p in plan.slots])
            grads = asked.aligned(plan.outputs)
            call.check_grads(grads)
            return call.vjp(grads)

        return Response(pack_vjp(plan, await service.compute(run)), media_type=WIRE_MEDIA)

    @app.delete("/v1/sessions/{session}")
    def release(session: str, request: Request) -> dict[str, bool]:
        return {"released": service.store.release(service.client(request), session)}

    if extra is not None:
        extra(app, service)
    return app


def _vjp_call(service: Service, client: str, message: Message, asked: VjpRequest) -> BoundaryCall:
    """The call a VJP request differentiates; its gradients checked before any compute (shapes, once known)."""
    if asked.recompute:
        handle, plan = service.plan(client, message)
        call = handle.open_call(plan)
        call.check_grads(asked.aligned(plan.outputs))  # names and dtypes now; shapes after the forward
        return call
    assert asked.session is not None  # unpack_grads refuses a request with neither
    try:
        kept = service.store.peek(client, asked.session)
        kept.check_grads(asked.aligned(kept.plan.outputs))  # checked before the session is used up
        return service.store.take(client, asked.session)
    except SessionGone:
        raise HTTPProblem(410, "session_gone", "the session expired or lives elsewhere; "
                          "resend the forward with recompute") from None


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    for close in reversed(app.state.on_close):
        close()


def _json(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidInputError("the body must be JSON, e.g. {\"texts\": [\"a cat\"]}") from None


def _install_errors(app: FastAPI) -> None:
    def answer(status: int, kind: str, detail: str) -> JSONResponse:
        return JSONResponse({"error": kind, "detail": detail}, status_code=status)

    @app.exception_handler(HTTPProblem)
    async def problem(_: Request, err: HTTPProblem) -> JSONResponse:
        return answer(err.status, err.kind, err.detail)

    @app.exception_handler(ProtocolError)
    async def protocol(_: Request, err: ProtocolError) -> JSONResponse:
        return answer(400, "protocol", str(err))

    @app.exception_handler(QuotaExceeded)
    async def quota(_: Request, err: QuotaExceeded) -> JSONResponse:
        return answer(429, "quota", str(err))

    @app.exception_handler(GraytuneError)
    async def graytune_error(_: Request, err: GraytuneError) -> JSONResponse:
        if isinstance(err, AccessDeniedError):
            return answer(403, "access_denied", str(err))
        kind = "unknown_name" if isinstance(err, UnknownNameError) else "invalid_input"
        return answer(400, kind, str(err))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error while serving a request")
        return answer(500, "internal", "the server failed on this request; the owner can find it in the log")
