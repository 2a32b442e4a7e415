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
from collections.abc import Callable
from functools import partial
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
from graytune.serve.admission import (
    HTTPProblem, busy, check_texts, check_work, duplicate_problem, forward_digest, repeated_rows, seen_rows, tokens_of,
)
from graytune.serve.bodies import RequestBody, json_limit, parse_json
from graytune.serve.config import BLACK_BOX_EDITS, DUPLICATE_ROWS, ApiKeys, ServeConfig
from graytune.serve.edits import note_edits, refuse_edits
from graytune.serve.ledger import Charge, QuotaLedger
from graytune.serve.memory import trim
from graytune.serve.refusals import UNAUTHORIZED, level_refused, server_hint
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
        if config.black_box_edits not in BLACK_BOX_EDITS:
            raise InvalidInputError(f"--black-box-edits is {config.black_box_edits!r}; choose one of "
                                    f"{', '.join(BLACK_BOX_EDITS)} (count serves such edits and records them)")
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
                                  config.quota_grad_rows, tokens=config.quota_tokens)
        self.compute_lock = threading.Lock()
        self.max_body = int(config.max_body_mb * 2**20)
        self.inflight_budget = int(config.inflight_body_mb * 2**20)
        self.inflight = 0  # bytes reserved by requests being read or waiting (event loop only)
        self.queued = 0  # requests waiting for or using the backbone (event loop only)
        self.compute_s = 1.0  # a moving average of one backbone call, for Retry-After
        self.served, self._trimmed = 0, 0  # backbone calls made, and how many had been when memory was returned
        self._limiters: dict[str, anyio.CapacityLimiter] = {}
        self._specs: dict[AccessLevel, dict[str, Any]] = {}  # one per level (``spec``)
        #: more figures for ``/v1/stats``: each is called with the client (``None``: every client's, for an admin)
        self.stat_sources: list[Callable[[str | None], dict[str, Any]]] = []
        #: forwards and VJPs of different clients joined into shared backbone calls (``--coalesce-ms``; a
        #: ``graytune.serve.coalesce.Joiner`` that ``create_app`` sets, None when off)
        self.joiner: Any = None

    def close(self) -> None:
        self.ledger.close()
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)

    # ---- who asks ------------------------------------------------------------------------------------

    def client(self, request: Request) -> str:
        name = self.keys.client(request.headers.get("authorization"))
        if name is None:
            raise HTTPProblem(401, "unauthorized", UNAUTHORIZED)
        return name

    def is_admin(self, client: str) -> bool:
        return client in self.config.admins

    def level_handle(self, label: object) -> LocalHandle:
        """The handle at the level ``label`` names (the granted one when empty); 403 above the grant, naming the
        methods this level allows and the owner's flag (``graytune.serve.refusals``)."""
        level = AccessLevel.parse(str(label)) if label else self.granted
        if level > self.granted:
            raise level_refused(level, self.handle)
        return self._levels[level]

    def spec(self, label: str | None) -> dict[str, Any]:
        """``/v1/spec``'s answer at a level, computed once per level: every spelling of a level shares one
        entry, so the cache holds at most one per level however many spellings clients send."""
        level = self.level_handle(label)
        if level.access not in self._specs:
            self._specs[level.access] = {"spec": level.spec.to_dict(), "access": level.access.label,
                                         "granted": self.granted.label, "reads": sorted(level.grants),
                                         "top_k": level.top_k_grant,
                                         "placement": {"device": level.device.type, "dtype": dtype_name(level.dtype),
                                                       "recompute": level.recompute},
                                         "max_body_bytes": self.max_body,
                                         "black_box_edits": self.config.black_box_edits,
                                         "max_new_tokens": self.config.max_new_tokens,
                                         "max_denoising_work": self.config.max_denoising_work}
        return self._specs[level.access]

    @property
    def edits_policy(self) -> str:
        """What ``--black-box-edits`` asks of black-box edits here: the flag where the server lends black-box;
        ``allow`` from dark-gray up, where a client may ask the exact VJP instead (``graytune.serve.edits``)."""
        return self.config.black_box_edits if self.granted is AccessLevel.BLACK_BOX else "allow"

    def refusal(self, err: AccessDeniedError) -> str:
        """The 403 detail for ``err``: its own words, then what this server allows and the owner's flag for more."""
        detail = str(err)
        return detail if "this server lends" in detail else f"{detail}; {server_hint(self.handle, err.needed)}"

    # ---- what they send ------------------------------------------------------------------------------

    def deadline(self) -> float:
        return time.monotonic() + self.config.request_timeout_s

    def body(self, request: Request, limit: int | None = None) -> RequestBody:
        """The request body, read within ``--body-timeout-s`` (408 after; 413 past ``limit`` bytes, by default
        ``--max-body-mb``; see ``graytune.serve.bodies``).

        ``async with service.body(request) as body:`` counts its memory against ``--inflight-body-mb``
        as it arrives, until the block ends (503 with ``Retry-After`` past it); ``await service.body(request)``
        only while it is read.
        """
        return RequestBody(self, request, limit)

    async def json(self, request: Request) -> Any:
        """The request's JSON body, its size and structure bounded before it is parsed (``bodies.parse_json``)."""
        async with self.body(request, json_limit(self.config)) as body:
            return await self.checked(parse_json, body, self.config)

    async def checked(self, work: Callable[..., T], *args: Any) -> T:
        """Run ``work(*args)`` (decoding, checks, tokenizing, quota charges) off the event loop."""
        return await anyio.to_thread.run_sync(work, *args, limiter=self._limiter("checks", 4))

    def plan(self, client: str, message: Message, recompute: bool = False) -> tuple[LocalHandle, CallPlan]:
        """The checked forward a request describes, its work within the limits (nothing charged).

        A request that wants gradients and repeats a row is counted or refused as ``--duplicate-rows`` says
        (a ``recompute`` resends a forward already counted, so it is not counted again); a black-box request that
        edits an input port is refused here where ``--black-box-edits`` says so (``graytune.serve.edits``).
        """
        request = unpack_call(message)
        handle = self.level_handle(request.access)
        inputs: dict[str, Any] = dict(request.inputs)
        if request.texts is not None:
            check_texts(request.texts, self.config)
            inputs["text"] = request.texts
        grad = bool(message[1].get("grad"))
        check_work(inputs, request.insert, self.config, grad)  # ids and pixels, before texts are tokenized
        plan = handle.plan(inputs, request.add, request.insert, request.outputs, request.reads, request.top_k)
        check_work(plan.inputs, plan.insert, self.config, bool(plan.slots))
        refuse_edits(self.edits_policy, handle, plan)
        if plan.slots and self.config.duplicate_rows != "allow":
            self._check_duplicates(client, handle, plan, count=not recompute)
        return handle, plan

    def _check_duplicates(self, client: str, handle: LocalHandle, plan: CallPlan, count: bool) -> None:
        """Refuse (403) or count a gradient request that repeats a row (``--duplicate-rows``)."""
        rows = rows_of(plan)
        if rows < 2:
            return
        ranks = {port.name: len(port.shape) for port in handle.spec.ports}
        repeats = repeated_rows(rows, seen_rows(rows, plan.inputs, plan.add, plan.insert, ranks))
        if not repeats:
            return
        if self.config.duplicate_rows == "refuse":
            raise duplicate_problem(rows, repeats)
        if count:
            self.ledger.note_duplicates(client, len(repeats))
            log.warning("client %s sent a gradient request in which %d of %d rows repeat an earlier row "
                        "(counted: --duplicate-rows count)", client, len(repeats), rows)

    def charge_forward(self, client: str, message: Message, plan: CallPlan,
                       handle: LocalHandle | None = None) -> Charge:
        """Charge a checked forward its rows and tokens; one that wants gradients leaves a receipt for its
        recompute. Once charged, a black-box edit of ``handle``'s is recorded as ``--black-box-edits count`` says."""
        receipt = forward_digest(message) if plan.slots else None
        rows, tokens = rows_of(plan), tokens_of(plan.inputs)
        self.ledger.charge(client, rows, receipt=receipt, tokens=tokens)
        if handle is not None:
            note_edits(self.ledger, client, handle, plan, self.edits_policy)
        return Charge(samples=rows, tokens=tokens, receipt=receipt)

    def vjp_call(self, client: str, message: Message) -> tuple[BoundaryCall, list[Tensor | None], Charge]:
        """The call a VJP request differentiates, the outputs' gradients, and what it was charged (after every
        check).

        A recompute (after a 410) pays its gradient rows, and its samples too unless this client paid for
        that very forward (its receipt, used up here): recomputes sent without forwards skip no quota.
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
        if asked.recompute:
            receipt, batch = forward_digest(message), rows_of(call.plan)
            tokens = tokens_of(call.plan.inputs)
            samples = self.ledger.charge_recompute(client, receipt, batch, rows, tokens)
            return call, grads, Charge(samples, rows, tokens if samples else 0, receipt,
                                       restore=0 if samples else batch)
        self.ledger.charge(client, grad_rows=rows)
        try:
            self.store.take(client, str(asked.session))
        except SessionGone:  # expired or evicted since the peek
            self.ledger.refund(client, grad_rows=rows)
            raise HTTPProblem(410, *GONE) from None
        return call, grads, Charge(grad_rows=rows)

    async def refund(self, client: str, samples: int = 0, grad_rows: int = 0, charge: Charge | None = None) -> None:
        """Give back what a request reserved when its work was not served (even while it is being cancelled):
        ``samples`` and ``grad_rows``, or a whole ``charge`` with its tokens and receipt."""
        charge = charge or Charge(samples, grad_rows)
        with anyio.CancelScope(shield=True):
            await self.checked(partial(self.ledger.refund, client, charge.samples, charge.grad_rows, charge.receipt,
                                       charge.restore, charge.tokens))

    # ---- one backbone at a time ----------------------------------------------------------------------

    async def compute(self, work: Callable[[], T], until: float) -> T:
        """Run ``work`` on the backbone by ``until`` (``time.monotonic()``): 503 at once when too many wait,
        503 if the backbone stays busy until then, 504 if the work itself runs past it (it stops there)."""
        if self.queued > self.config.max_queue:
            raise busy(self.compute_s * self.queued, f"{self.queued} requests wait for the backbone (--max-queue)",
                       self.queued)
        self.queued += 1
        try:
            return await anyio.to_thread.run_sync(self._locked, work, until,
                                                  limiter=self._limiter("compute", self.config.max_queue + 1))
        finally:
            self.queued -= 1

    def _locked(self, work: Callable[[], T], until: float) -> T:
        if not self.compute_lock.acquire(timeout=max(0.0, until - time.monotonic())):
            raise busy(self.compute_s * max(1, self.queued), "the backbone stayed busy until this request's "
                       "deadline (--request-timeout-s)", self.queued)
        start = time.monotonic()
        try:
            with deadline(until):
                return work()
        except DeadlineExceeded:
            raise timed_out(self.config.request_timeout_s) from None
        finally:
            self.compute_lock.release()
            self.compute_s = 0.8 * self.compute_s + 0.2 * (time.monotonic() - start)
            self.served += 1

    async def return_memory(self) -> None:
        """Once the backbone is idle after some work, return what the allocator keeps to the system
        (``graytune.serve.memory.trim``; on the sweep timer, off the event loop)."""
        if self.queued == 0 and self.served != self._trimmed:
            self._trimmed = self.served
            await self.checked(trim)

    def _limiter(self, name: str, size: int) -> anyio.CapacityLimiter:
        if name not in self._limiters:  # made on the event loop, where anyio can find it
            self._limiters[name] = anyio.CapacityLimiter(size)
        return self._limiters[name]

    # ---- what callers see of their own use -----------------------------------------------------------

    @property
    def quotas(self) -> SimpleNamespace:
        """Usage as ``quotas.used[client] == [samples, grad_rows]``: a read-only view of the ledger kept for
        code written before it (use ``ledger.used(client)``, which has tokens too)."""
        return SimpleNamespace(used={c: [u["samples"], u["grad_rows"]] for c, u in self.ledger.all_used().items()})

    def stats(self, client: str) -> dict[str, Any]:
        """The caller's own figures; every client's for an admin."""
        config = self.config
        limits = {"quota_samples": config.quota_samples, "quota_grad_rows": config.quota_grad_rows,
                  "quota_tokens": config.quota_tokens, "duplicate_rows_policy": config.duplicate_rows,
                  "black_box_edits_policy": config.black_box_edits}
        extra = {k: v for source in self.stat_sources for k, v in source(None if self.is_admin(client)
                                                                         else client).items()}
        if self.is_admin(client):
            return {**self.store.stats(), "quota": self.ledger.all_used(), **limits, "queued": self.queued,
                    "duplicates": self.ledger.all_duplicates(), "edits": self.ledger.all_edits(), **extra}
        used, repeated, edits = self.ledger.used(client), self.ledger.duplicates(client), self.ledger.edits(client)
        return {**self.store.stats(client), "samples_used": used["samples"], "grad_rows_used": used["grad_rows"],
                "tokens_used": used["tokens"], **limits, "duplicate_row_batches": repeated["batches"],
                "duplicate_rows": repeated["rows"], "black_box_edit_calls": edits["calls"],
                "black_box_edit_rows": edits["rows"], "same_input_edit_batches": edits["batches"],
                "same_input_edit_rows": edits["same_rows"], **extra}


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
