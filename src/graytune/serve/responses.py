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

__all__ = ["OPENAI_ROUTES", "WIRE_MEDIA", "answer", "install_error_handlers", "openai_answer", "problem_of",
           "wire_response"]
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
    for kind in (HTTPProblem, ProtocolError, QuotaExceeded, DeadlineExceeded, GraytuneError, Exception):
        app.add_exception_handler(kind, _handle)


def problem_of(err: BaseException, service: Service) -> HTTPProblem:
    """The answer to ``err`` (status, kind, detail): what a route's error handler sends, and what a streamed
    answer sends as its last line once its status has gone out."""
    if isinstance(err, HTTPProblem):
        return err
    if isinstance(err, ProtocolError):
        return HTTPProblem(400, "protocol", str(err))
    if isinstance(err, QuotaExceeded):
        return HTTPProblem(429, "quota", str(err))
    if isinstance(err, DeadlineExceeded):
        return timed_out(service.config.request_timeout_s)
    if isinstance(err, AccessDeniedError):
        return HTTPProblem(403, "access_denied", service.refusal(err))
    if isinstance(err, NumericalError):  # the owner's precision, not the client's input
        return HTTPProblem(500, "numerical", str(err))
    if isinstance(err, GraytuneError):
        return HTTPProblem(400, "unknown_name" if isinstance(err, UnknownNameError) else "invalid_input", str(err))
    log.error("unexpected error while serving a request: %s", type(err).__name__, exc_info=err)
    return HTTPProblem(500, "internal", "the server failed on this request; the owner can find it in the log")


#: routes in OpenAI's shape (``graytune serve --jobs``): their errors also carry OpenAI's error object
OPENAI_ROUTES = ("/v1/files", "/v1/fine_tuning/", "/v1/models", "/v1/embeddings", "/v1/completions",
                 "/v1/chat/completions")


def openai_answer(problem: HTTPProblem) -> JSONResponse:
    """``problem`` as OpenAI's clients read an error, ``{"error": {"message", "type", "code", "param"}}`` (the SDK
    puts ``message`` in its exception), with graytune's ``detail`` beside it."""
    error = {"message": problem.detail, "type": problem.kind, "code": problem.kind, "param": None}
    return JSONResponse({"error": error, "detail": problem.detail}, status_code=problem.status,
                        headers=problem.headers)


async def _handle(request: Request, err: Exception) -> JSONResponse:
    problem = problem_of(err, request.app.state.service)
    return openai_answer(problem) if request.url.path.startswith(OPENAI_ROUTES) else answer(problem)
