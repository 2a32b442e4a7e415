"""Request bodies: read within a deadline and a size, counted against the memory held in flight, and JSON
bounded by its structure before it is parsed.

A body counts against ``--inflight-body-mb`` as its bytes *arrive* (twice: the bytes and the tensors
decoded from them), never by the ``Content-Length`` it declares: four stalled uploads that declared
64 MB each used to hold the whole budget for the body deadline and every other request got 503.

JSON bodies (``/v1/tokenize``, releases, hosted adapters) are small by nature: strings within the text
limits. They are read only up to ``json_limit`` (what the text limits can need, a few MB), and their
structure is counted before ``json.loads`` builds anything: at most ``max_json_items`` values and
``MAX_JSON_DEPTH`` levels of nesting (``parse_json``). Four 63 MB bodies of nested lists used to take
the server from 1.0 to 7.2 GB.

A client that goes away while sending its body is logged as one line (no traceback).

Example:
    >>> async with service.body(request, limit=json_limit(service.config)) as body:
    ...     payload = await service.checked(parse_json, body, service.config)
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Generator
from typing import Any, Protocol

import anyio
import torch
from fastapi import Request
from starlette.requests import ClientDisconnect

from graytune.errors import InvalidInputError
from graytune.serve.admission import HTTPProblem, busy, too_large
from graytune.serve.config import ServeConfig



class Service(Protocol):
    """What reading a body needs of the service (``graytune.serve.service.Service``): its in-flight budget."""

    config: ServeConfig
    max_body: int
    inflight: int
    inflight_budget: int
    compute_s: float
    queued: int

log = logging.getLogger(__name__)
#: the deepest nesting a JSON body may have (graytune's own bodies nest 2 levels)
MAX_JSON_DEPTH = 8
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # one JSON string literal, escapes included
_EXAMPLE = 'e.g. {"texts": ["a cat"]}'


def json_limit(config: ServeConfig) -> int:
    """The largest JSON body the text limits can need, in bytes: every character escaped as a surrogate pair
    (12 bytes), quotes and commas, and room for the other fields; never above ``--max-body-mb``."""
    return min(int(config.max_body_mb * 2**20), 12 * config.max_request_chars + 8 * config.max_texts + 65536)


def max_json_items(config: ServeConfig) -> int:
    """The most values a JSON body may hold: texts and classes at their limits, and a few fields."""
    return 2 * config.max_texts + 256


def parse_json(body: bytes, config: ServeConfig) -> Any:
    """``body`` parsed as JSON once its structure is within bounds (413 past a bound, 400 if not JSON).

    Strings are set aside first (a regular expression, no Python loop over the bytes); what is left holds
    every bracket and comma, so nesting (400 past ``MAX_JSON_DEPTH``) and values (413) are counted before
    anything is built.
    """
    structure = _STRING.sub(b'""', body)
    brackets = re.sub(rb"[^\[\]{}]", b"", structure)
    if brackets:
        codes = torch.frombuffer(bytearray(brackets), dtype=torch.uint8)
        steps = ((codes == ord("[")) | (codes == ord("{"))).to(torch.int32) * 2 - 1  # +1 opens, -1 closes
        deepest = int(steps.cumsum(0).max())
        if deepest > MAX_JSON_DEPTH:
            raise InvalidInputError(f"the body nests JSON too deeply ({deepest:,} levels; the server reads at most "
                                    f"{MAX_JSON_DEPTH}): send {_EXAMPLE}")
    items = structure.count(b",") + len(brackets) // 2 + 1
    limit = max_json_items(config)
    if items > limit:
        raise too_large(f"this JSON body holds about {items:,} values", limit, "twice --max-texts, and 256",
                        f"send strings in one flat list, {_EXAMPLE}")
    try:
        return json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidInputError(f"the body must be JSON, {_EXAMPLE}") from None
    except RecursionError:  # not reached within MAX_JSON_DEPTH; kept for safety
        raise InvalidInputError(f"the body nests JSON too deeply; send {_EXAMPLE}") from None


class RequestBody:
    """One request's body and the in-flight memory it holds (see ``Service.body``)."""

    def __init__(self, service: Service, request: Request, limit: int | None = None) -> None:
        self.service, self.request, self.reserved = service, request, 0
        self.limit = service.max_body if limit is None else min(limit, service.max_body)

    def __await__(self) -> Generator[Any, None, bytes]:
        return self._read_and_release().__await__()

    async def __aenter__(self) -> bytes:
        try:
            return await self._read()
        except BaseException:
            self._release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    async def _read_and_release(self) -> bytes:
        try:
            return await self._read()
        finally:
            self._release()

    def _reserve(self, nbytes: int) -> None:
        service = self.service
        if service.inflight + 2 * nbytes > service.inflight_budget:
            raise busy(service.compute_s * (service.queued + 1), "the server holds as many request bodies as it "
                       "may (--inflight-body-mb)")
        service.inflight += 2 * nbytes  # the bytes, and the tensors decoded from them
        self.reserved += 2 * nbytes

    def _release(self) -> None:
        self.service.inflight -= self.reserved
        self.reserved = 0

    def _too_large(self, size: str) -> HTTPProblem:
        which = "request bodies" if self.limit == self.service.max_body else "JSON bodies (from the text limits)"
        return HTTPProblem(413, "too_large", f"{which} are limited to {self.limit} bytes (--max-body-mb, "
                           f"--max-request-chars); this one has {size}: send smaller batches")

    async def _read(self) -> bytes:
        config = self.service.config
        declared = self.request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            raise self._too_large(declared)
        chunks, size = [], 0
        try:
            with anyio.fail_after(config.body_timeout_s):
                async for chunk in self.request.stream():
                    size += len(chunk)
                    if size > self.limit:
                        raise self._too_large(f"over {self.limit}")
                    self._reserve(len(chunk))  # what arrived, never what was declared
                    chunks.append(chunk)
        except TimeoutError:
            raise HTTPProblem(408, "body_timeout", f"the body did not arrive within {config.body_timeout_s} s "
                              "(--body-timeout-s); check the connection and send it again") from None
        except ClientDisconnect:
            client = self.request.client.host if self.request.client else "-"
            log.info("%s %s: the client (%s) went away after %d of %s body bytes", self.request.method,
                     self.request.url.path, client, size, declared or "?")
            raise HTTPProblem(400, "disconnected", "the connection closed before the body arrived") from None
        body = b"".join(chunks)
        if declared is not None and len(body) != int(declared):
            raise HTTPProblem(400, "truncated", f"the body has {len(body)} bytes, Content-Length said {declared}")
        return body
