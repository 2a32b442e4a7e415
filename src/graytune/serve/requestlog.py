"""The owner's log of refused and failed requests: who asked, which route, the status and why.

Every answer with a status of 400 or more is logged at WARNING (500 and more at ERROR), so an owner running
``graytune serve`` at its default verbosity sees 401, 403, 413, 429 and the rest as they happen::

    WARNING graytune.serve.requests: alice POST /v1/forward -> 429 quota: client alice has used ...

The client is named by its API key's name in the key file, never by the key; a request without a valid key
is named by its address. The reason is the answer's own ``error`` and ``detail``. ``graytune -v serve`` adds
uvicorn's log of every request. A streamed generation whose error comes after its status (200) logs its
error through ``log_request``.

Example:
    >>> app.add_middleware(RequestLog, verify=keys.client)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["RequestLog", "log_refused", "log_request", "route_of"]
log = logging.getLogger("graytune.serve.requests")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
#: the most bytes of an error's body kept to find its reason (graytune's own error bodies are far smaller)
_BODY_LIMIT = 8192
#: the most characters of a reason logged
_REASON_LIMIT = 600


class RequestLog:
    """ASGI middleware that logs every answer of status 400 and more (see the module's docstring)."""

    def __init__(self, app: Callable[..., Awaitable[None]], verify: Callable[[str | None], str | None]) -> None:
        self.app, self.verify = app, verify

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status, body = 0, bytearray()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and status >= 400:
                if len(body) < _BODY_LIMIT:
                    body.extend(message.get("body", b"")[: _BODY_LIMIT - len(body)])
                if not message.get("more_body", False):
                    log_refused(scope, self.verify, status, reason_of(bytes(body)))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as err:  # answered 500 by the app's outermost handler, which logs the traceback
            if status == 0:
                log_refused(scope, self.verify, 500, f"internal: {type(err).__name__}")
            raise


def log_refused(scope: Scope, verify: Callable[[str | None], str | None], status: int, reason: str) -> None:
    """Log one refused or failed request: the client (key name, else address), method, route, status, reason."""
    if log.isEnabledFor(logging.WARNING):
        log_request(client_of(scope, verify), str(scope.get("method", "-")), route_of(scope), status, reason)


def log_request(client: str, method: str, route: str, status: int, reason: str) -> None:
    """Log one refused or failed request already named: ERROR from 500, WARNING below."""
    log.log(logging.ERROR if status >= 500 else logging.WARNING, "%s %s %s -> %d %s", client, method, route,
            status, reason[:_REASON_LIMIT])


def client_of(scope: Scope, verify: Callable[[str | None], str | None]) -> str:
    """The name of the request's API key in the key file; its address (``address 1.2.3.4``) without a valid key."""
    headers = dict(scope.get("headers") or [])
    authorization = headers.get(b"authorization")
    name = verify(authorization.decode("latin-1")) if authorization else None
    if name is not None:
        return name
    address = scope.get("client")
    return f"address {address[0]}" if address else "address -"


def route_of(scope: Scope) -> str:
    """The request's path, with a session id in it (``DELETE /v1/sessions/<id>``) left out."""
    path = str(scope.get("path", "-"))
    if path.startswith("/v1/sessions/") and path != "/v1/sessions/release":
        return "/v1/sessions/<redacted>"
    return path


def reason_of(body: bytes) -> str:
    """``kind: detail`` from an error body ``{"error", "detail"}`` (FastAPI's own ``{"detail"}``, and the job routes'
    ``{"error": {"type", ...}, "detail"}``, too)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace") or "(no body)"
    if not isinstance(payload, dict):
        return str(payload)
    detail = payload.get("detail", "")
    detail = detail if isinstance(detail, str) else json.dumps(detail)
    kind = payload.get("error")
    kind = kind.get("type") if isinstance(kind, dict) else kind  # OpenAI's error object (the job routes)
    return f"{kind}: {detail}" if kind else detail
