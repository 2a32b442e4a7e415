"""What the service answers: wire messages on success, ``{"error", "detail"}`` with a status otherwise.

Every failure a request can meet is turned into a JSON body here and never into a stack trace:
``HTTPProblem`` carries its own status and headers, the library's errors map to 4xx by kind (403 for a
level above the grant, the detail naming the level needed and what this server allows;
400 otherwise; 500 for the owner's own precision), a quota to 429, a deadline to 504, and anything
unexpected to a 500 that points at the owner's log.

Example:
    >>> install_error_handlers(app)
    >>> return wire_response(encode({"embeds": embeds}))
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from graytune.access.owner import DeadlineExceeded
from graytune.access.wire import ProtocolError
from graytune.errors import AccessDeniedError, GraytuneError, NumericalError, UnknownNameError
from graytune.serve.admission import HTTPProblem
from graytune.serve.ledger import QuotaExceeded
from graytune.serve.service import Service, timed_out

__all__ = ["WIRE_MEDIA", "answer", "install_error_handlers", "wire_response"]
log = logging.getLogger(__name__)
WIRE_MEDIA = "application/vnd.graytune.safetensors"


def wire_response(body: bytes) -> Response:
    """A message of ``graytune.access.wire`` (safetensors bytes) as the response."""
    return Response(body, media_type=WIRE_MEDIA)


def answer(problem: HTTPProblem) -> JSONResponse:
    """The response for ``problem``: ``{"error", "detail"}`` with its status and headers."""
    return JSONResponse({"error": problem.kind, "detail": problem.detail}, status_code=problem.status,
                        headers=problem.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every exception a route raises as ``{"error", "detail"}`` (see the module's docstring)."""
    app.add_exception_handler(HTTPProblem, _problem)
    app.add_exception_handler(ProtocolError, _protocol)
    app.add_exception_handler(QuotaExceeded, _quota)
    app.add_exception_handler(DeadlineExceeded, _deadline)
    app.add_exception_handler(GraytuneError, _graytune_error)
    app.add_exception_handler(Exception, _unexpected)


def _plain(status: int, kind: str, detail: str) -> JSONResponse:
    return answer(HTTPProblem(status, kind, detail))


async def _problem(_: Request, err: HTTPProblem) -> JSONResponse:
    return answer(err)


async def _protocol(_: Request, err: ProtocolError) -> JSONResponse:
    return _plain(400, "protocol", str(err))


async def _quota(_: Request, err: QuotaExceeded) -> JSONResponse:
    return _plain(429, "quota", str(err))


async def _deadline(request: Request, _: DeadlineExceeded) -> JSONResponse:
    service: Service = request.app.state.service
    return answer(timed_out(service.config.request_timeout_s))


async def _graytune_error(request: Request, err: GraytuneError) -> JSONResponse:
    if isinstance(err, AccessDeniedError):
        service: Service = request.app.state.service
        return _plain(403, "access_denied", service.refusal(err))
    if isinstance(err, NumericalError):  # the owner's precision, not the client's input
        return _plain(500, "numerical", str(err))
    kind = "unknown_name" if isinstance(err, UnknownNameError) else "invalid_input"
    return _plain(400, kind, str(err))


async def _unexpected(_: Request, err: Exception) -> JSONResponse:
    log.error("unexpected error while serving a request: %s", type(err).__name__, exc_info=err)
    return _plain(500, "internal", "the server failed on this request; the owner can find it in the log")
