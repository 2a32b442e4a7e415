"""The owner's side of each request: who asks, what they send, what it may cost, and one backbone at a time.

Work moves in three places so that nothing cheap ever waits for the backbone:

- the event loop authenticates, reads bodies (with a deadline and a memory budget for bodies in
  flight) and answers health, spec, stats and releases itself;
- a small thread pool of its own decodes, checks, tokenizes and charges quotas (``checked``);
- the backbone runs on threads of another limiter (``compute``): at most ``--max-queue`` requests
  wait for it (more get 503 with ``Retry-After`` at once), one runs at a time, and a request past its
  deadline stops at the backbone's next safe point (``graytune.access.owner.deadline``) and answers 504.

Example:
    >>> service = Service(graytune.open_backbone("minilm", "dark-gray"), ServeConfig(), ApiKeys({"me": KEY}))
    >>> handle, plan = service.plan("me", read_request(body))          # on a checks thread
    >>> values, call = await service.compute(lambda: ..., service.deadline())
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import anyio
import torch
from fastapi import Request

from graytune.access import CallPlan, LocalHandle
from graytune.access.owner import BoundaryCall, DeadlineExceeded, deadline
from graytune.access.wire import Message, VjpRequest, unpack_call, unpack_grads
from graytune.devices import dtype_name
from graytune.errors import AccessDeniedError, InvalidInputError
from graytune.serve.admission import HTTPProblem, busy, check_texts, check_work, duplicate_problem, repeated_rows
from graytune.serve.config import DUPLICATE_ROWS, ApiKeys, ServeConfig
from graytune.serve.ledger import QuotaLedger
from graytune.serve.sessions import SessionGone, SessionStore
from graytune.types import AccessLevel

log = logging.getLogger(__name__)
T = TypeVar("T")
Tensor = torch.Tensor
GONE = ("session_gone", "the session expired, was evicted or lives elsewhere; resend the forward with recompute")


class Service:
    """Handles at each level, sessions, the quota ledger, the limits and the compute lock."""

    def __init__(self, handle: LocalHandle, config: ServeConfig, keys: ApiKeys) -> None:
        granted = AccessLevel.parse(config.access)
        if granted >= AccessLevel.WHITE_BOX or handle.access >= AccessLevel.WHITE_BOX:
            raise InvalidInputError("white-box access never crosses the network; serve at black-box, "
                                    "dark-gray or light-gray and share weights another way if you mean to")
        if config.duplicate_rows not in DUPLICATE_ROWS:
            raise InvalidInputError(f"--duplicate-rows is {config.duplicate_rows!r}; choose one of "
                                    f"{', '.join(DUPLICATE_ROWS)} (count serves such batches and records them)")
        unknown = sorted(set(config.admins) - keys.names)
        if unknown:
            raise InvalidInputError(f"--admins names {unknown}, which the key file does not; "
                                    f"its clients are {sorted(keys.names)}")
        self.handle = handle.at_level(granted) if granted < handle.access else handle
        self.granted, self.config, self.keys = self.handle.access, config, keys
        self._levels = {level: self.handle.at_level(level) for level in AccessLevel if level <= self.granted}
        self.store = SessionStore(config.session_ttl_s, int(config.session_budget_mb * 2**20),
                                  config.client_sessions, int(config.client_session_mb * 2**20))
        self._scratch = None if config.quota_db or keys.source else tempfile.mkdtemp(prefix="graytune-quota-")
        self.ledger = QuotaLedger(quota_path(config, keys, self._scratch), config.quota_samples,
                                  config.quota_grad_rows)
        self.compute_lock = threading.Lock()
        self.max_body = int(config.max_body_mb * 2**20)
        self.inflight_budget = int(config.inflight_body_mb * 2**20)
        self.inflight = 0  # bytes reserved by requests being read or waiting (event loop only)
        self.queued = 0  # requests waiting for or using the backbone (event loop only)
        self.compute_s = 1.0  # a moving average of one backbone call, for Retry-After
        self._limiters: dict[str, anyio.CapacityLimiter] = {}
        self._specs: dict[str | None, dict[str, Any]] = {}

    def close(self) -> None:
        self.ledger.close()
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)

    # ---- who asks ------------------------------------------------------------------------------------

    def client(self, request: Request) -> str:
        name = self.keys.client(request.headers.get("authorization"))
        if name is None:
            raise HTTPProblem(401, "unauthorized", "a valid API key is needed: send 'Authorization: Bearer KEY'")
        return name

    def is_admin(self, client: str) -> bool:
        return client in self.config.admins

    def level_handle(self, label: object) -> LocalHandle:
        level = AccessLevel.parse(str(label)) if label else self.granted
        if level > self.granted:
            raise AccessDeniedError(f"a handle at {level.label}", level.label, self.granted.label,
                                    "this server lends the backbone at most at that level")
        return self._levels[level]

    def spec(self, label: str | None) -> dict[str, Any]:
        """``/v1/spec``'s answer at a level (computed once per level)."""
        if label not in self._specs:
            level = self.level_handle(label)
            self._specs[label] = {"spec": level.spec.to_dict(), "access": level.access.label,
                                  "granted": self.granted.label, "reads": sorted(level.grants),
                                  "placement": {"device": level.device.type, "dtype": dtype_name(level.dtype),
                                                "recompute": level.recompute},
                                  "max_body_bytes": self.max_body}
        return self._specs[label]

    # ---- what they send ------------------------------------------------------------------------------

    def deadline(self) -> float:
        return time.monotonic() + self.config.request_timeout_s

    def body(self, request: Request) -> RequestBody:
        """The request body, read within ``--body-timeout-s`` (408 after; 413 past ``--max-body-mb``).

        ``async with service.body(request) as body:`` counts its memory against ``--inflight-body-mb``
        until the block ends (503 with ``Retry-After`` past it); ``await service.body(request)`` only
        while it is read.
        """
        return RequestBody(self, request)

    def _body_too_large(self, size: str) -> HTTPProblem:
        return HTTPProblem(413, "too_large", f"request bodies are limited to {self.max_body} bytes (--max-body-mb); "
                           f"this one has {size}: send smaller batches")

    async def checked(self, work: Callable[..., T], *args: Any) -> T:
        """Run ``work(*args)`` (decoding, checks, tokenizing, quota charges) off the event loop."""
        return await anyio.to_thread.run_sync(work, *args, limiter=self._limiter("checks", 4))

    def plan(self, client: str, message: Message, recompute: bool = False) -> tuple[LocalHandle, CallPlan]:
        """The checked forward a request describes, its work within the limits (nothing charged).

        A request that wants gradients and repeats a row is counted or refused as ``--duplicate-rows`` says
        (a ``recompute`` resends a forward already counted, so it is not counted again).
        """
        request = unpack_call(message)
        handle = self.level_handle(request.access)
        inputs: dict[str, Any] = dict(request.inputs)
        if request.texts is not None:
            check_texts(request.texts, self.config)
            inputs["text"] = request.texts
        grad = bool(message[1].get("grad"))
        check_work(inputs, request.insert, self.config, grad)  # ids and pixels, before texts are tokenized
        plan = handle.plan(inputs, request.add, request.insert, request.outputs, request.reads)
        check_work(plan.inputs, plan.insert, self.config, bool(plan.slots))
        if plan.slots and self.config.duplicate_rows != "allow":
            self._check_duplicates(client, handle, plan, count=not recompute)
        return handle, plan

    def _check_duplicates(self, client: str, handle: LocalHandle, plan: CallPlan, count: bool) -> None:
        """Refuse (403) or count a gradient request that repeats a row (``--duplicate-rows``)."""
        rows = rows_of(plan)
        if rows < 2:
            return
        ranks = {port.name: len(port.shape) for port in handle.spec.ports}
        per_row = [*plan.inputs.values(),
                   *(t for name, t in plan.add.items() if t.dim() == ranks[name] and t.shape[0] == rows),
                   *(t for t in plan.insert.values() if t.shape[0] == rows)]
        repeats = repeated_rows(rows, per_row)
        if not repeats:
            return
        if self.config.duplicate_rows == "refuse":
            raise duplicate_problem(rows, repeats)
        if count:
            self.ledger.note_duplicates(client, len(repeats))
            log.warning("client %s sent a gradient request in which %d of %d rows repeat an earlier row "
                        "(counted: --duplicate-rows count)", client, len(repeats), rows)

    def vjp_call(self, client: str, message: Message) -> tuple[BoundaryCall, list[Tensor | None], int]:
        """The call a VJP request differentiates, the outputs' gradients, and the gradient rows charged for it
        (after every check).

        A recompute (after a 410) is charged its gradient rows only: its forward was charged when first run.
        """
        asked: VjpRequest = unpack_grads(message)
        if asked.recompute:
            handle, plan = self.plan(client, message, recompute=True)
            call = handle.open_call(plan)
        else:
            try:
                call = self.store.peek(client, str(asked.session))
            except SessionGone:
                raise HTTPProblem(410, *GONE) from None
        grads = asked.aligned(call.plan.outputs)
        call.check_grads(grads)  # before the session is used up; a recompute's shapes once its forward ran
        rows = rows_of(call.plan) if call.plan.slots else 0
        self.ledger.charge(client, grad_rows=rows)
        if not asked.recompute:
            try:
                self.store.take(client, str(asked.session))
            except SessionGone:  # expired or evicted since the peek
                self.ledger.refund(client, grad_rows=rows)
                raise HTTPProblem(410, *GONE) from None
        return call, grads, rows

    async def refund(self, client: str, samples: int = 0, grad_rows: int = 0) -> None:
        """Give back what a request reserved when its work was not served (even while it is being cancelled)."""
        with anyio.CancelScope(shield=True):
            await self.checked(self.ledger.refund, client, samples, grad_rows)

    # ---- one backbone at a time ----------------------------------------------------------------------

    async def compute(self, work: Callable[[], T], until: float) -> T:
        """Run ``work`` on the backbone by ``until`` (``time.monotonic()``): 503 at once when too many wait,
        503 if the backbone stays busy until then, 504 if the work itself runs past it (it stops there)."""
        if self.queued > self.config.max_queue:
            raise busy(self.compute_s * self.queued, f"{self.queued} requests wait for the backbone (--max-queue)")
        self.queued += 1
        try:
            return await anyio.to_thread.run_sync(self._locked, work, until,
                                                  limiter=self._limiter("compute", self.config.max_queue + 1))
        finally:
            self.queued -= 1

    def _locked(self, work: Callable[[], T], until: float) -> T:
        if not self.compute_lock.acquire(timeout=max(0.0, until - time.monotonic())):
            raise busy(self.compute_s * max(1, self.queued), "the backbone stayed busy until this request's "
                       "deadline (--request-timeout-s)")
        start = time.monotonic()
        try:
            with deadline(until):
                return work()
        except DeadlineExceeded:
            raise timed_out(self.config.request_timeout_s) from None
        finally:
            self.compute_lock.release()
            self.compute_s = 0.8 * self.compute_s + 0.2 * (time.monotonic() - start)

    def _limiter(self, name: str, size: int) -> anyio.CapacityLimiter:
        if name not in self._limiters:  # made on the event loop, where anyio can find it
            self._limiters[name] = anyio.CapacityLimiter(size)
        return self._limiters[name]

    # ---- what callers see of their own use -----------------------------------------------------------

    @property
    def quotas(self) -> SimpleNamespace:
        """Usage as ``quotas.used[client] == [samples, grad_rows]``: a read-only view of the ledger kept for
        code written before it (use ``ledger.used(client)``)."""
        return SimpleNamespace(used={c: [u["samples"], u["grad_rows"]] for c, u in self.ledger.all_used().items()})

    def stats(self, client: str) -> dict[str, Any]:
        """The caller's own figures; every client's for an admin."""
        limits = {"quota_samples": self.config.quota_samples, "quota_grad_rows": self.config.quota_grad_rows}
        if self.is_admin(client):
            return {**self.store.stats(), "quota": self.ledger.all_used(), **limits, "queued": self.queued,
                    "duplicates": self.ledger.all_duplicates(), "duplicate_rows_policy": self.config.duplicate_rows}
        used, repeated = self.ledger.used(client), self.ledger.duplicates(client)
        return {**self.store.stats(client), "samples_used": used["samples"], "grad_rows_used": used["grad_rows"],
                **limits, "duplicate_row_batches": repeated["batches"], "duplicate_rows": repeated["rows"],
                "duplicate_rows_policy": self.config.duplicate_rows}


def timed_out(seconds: float) -> HTTPProblem:
    return HTTPProblem(504, "timeout", f"the request ran past its deadline of {seconds} s (--request-timeout-s) "
                       "and was stopped; send smaller batches, or ask the owner to raise the deadline")


def rows_of(plan: CallPlan) -> int:
    """The batch size of a checked call."""
    return int(next(iter(plan.inputs.values())).shape[0])


def quota_path(config: ServeConfig, keys: ApiKeys, scratch: str | None) -> Path:
    """Where the ledger lives: ``--quota-db``, else beside the key file, else a folder of this process."""
    if config.quota_db:
        return Path(config.quota_db)
    if keys.source is not None:
        return keys.source.with_name(keys.source.name + ".quota.sqlite3")
    assert scratch is not None
    return Path(scratch) / "quota.sqlite3"


class RequestBody:
    """One request's body and the in-flight memory it holds (see ``Service.body``)."""

    def __init__(self, service: Service, request: Request) -> None:
        self.service, self.request, self.reserved = service, request, 0

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

    async def _read(self) -> bytes:
        service, config = self.service, self.service.config
        declared = self.request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > service.max_body):
            raise service._body_too_large(declared)
        if declared is not None:
            self._reserve(int(declared))
        chunks, size = [], 0
        try:
            with anyio.fail_after(config.body_timeout_s):
                async for chunk in self.request.stream():
                    size += len(chunk)
                    if size > service.max_body:
                        raise service._body_too_large(f"over {service.max_body}")
                    if declared is None:
                        self._reserve(len(chunk))
                    chunks.append(chunk)
        except TimeoutError:
            raise HTTPProblem(408, "body_timeout", f"the body did not arrive within {config.body_timeout_s} s "
                              "(--body-timeout-s); check the connection and send it again") from None
        body = b"".join(chunks)
        if declared is not None and len(body) != int(declared):
            raise HTTPProblem(400, "truncated", f"the body has {len(body)} bytes, Content-Length said {declared}")
        return body
