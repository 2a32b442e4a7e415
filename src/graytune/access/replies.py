"""What a backbone server's replies mean to the client: the errors they raise here, how long a busy one
asks to wait, and the queue state it reports.

A busy reply (503) carries ``Retry-After`` and, when the server knows it, ``X-Graytune-Queued``: how many
requests wait for or use the backbone. The client keeps the last one it saw as ``RemoteHandle.queue_state``.

Example:
    >>> state = busy_state(response)   # a 503 with Retry-After: 2 and X-Graytune-Queued: 9
    >>> state["queued"], state["retry_after_s"]
    (9, 2.0)
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpx

from graytune.errors import InvalidInputError, NumericalError, RemoteAccessDeniedError, RemoteError

#: the header of a busy reply that counts the requests waiting for or using the backbone
QUEUED_HEADER = "X-Graytune-Queued"


def retry_after(response: httpx.Response) -> float | None:
    """The server's ``Retry-After`` in seconds (capped at 30), if it sent one as a number."""
    value = response.headers.get("retry-after", "")
    return min(30.0, float(value)) if value.replace(".", "", 1).isdigit() else None


def busy_state(response: httpx.Response) -> dict[str, Any]:
    """``{"status", "queued", "retry_after_s", "at"}`` of a busy reply (502/503): ``queued`` and
    ``retry_after_s`` are None where the server did not say; ``at`` is when it came (unix time)."""
    queued = response.headers.get(QUEUED_HEADER, "")
    return {"status": response.status_code, "queued": int(queued) if queued.isdigit() else None,
            "retry_after_s": retry_after(response), "at": time.time()}


def busy_problem(state: dict[str, Any]) -> str:
    """How the retry log names a busy reply, e.g. ``is busy (503, 9 in the queue)``."""
    queued = "" if state["queued"] is None else f", {state['queued']} in the queue"
    return f"is busy ({state['status']}{queued})"


def error_of_response(response: httpx.Response) -> Exception:
    """What a refused request (4xx/5xx other than busy) raises here."""
    try:
        payload = response.json()
        kind, detail = str(payload["error"]), str(payload["detail"])
    except (ValueError, KeyError, TypeError):
        kind, detail = "http", response.text[:200]
    return error_of(response.status_code, kind, detail)


def error_of(status: int, kind: str, detail: str) -> Exception:
    """What a server's ``{"error": kind, "detail"}`` with ``status`` raises here (as the same request in process)."""
    if status == 400:
        refused = InvalidInputError(f"the backbone server refused the request: {detail}")
        refused.kind = kind  # type: ignore[attr-defined]  # e.g. unknown_name, protocol
        return refused
    if status == 403 and kind == "access_denied":  # what the same request raises in process
        needed = re.search(r"needs access level ([a-z-]+)|^([a-z-]+) access was asked for", detail)
        granted = re.search(r"was granted ([a-z-]+)|this server lends \S+ at ([a-z-]+)", detail)
        return RemoteAccessDeniedError(detail, next((g for g in needed.groups() if g), "") if needed else "",
                                       next((g for g in granted.groups() if g), "") if granted else "")
    if kind == "numerical":
        return NumericalError(f"on the backbone server: {detail}")
    return RemoteError(status, kind, detail)
