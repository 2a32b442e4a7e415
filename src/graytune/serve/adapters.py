"""Many adapters on one backbone: the server hosts trained adapters and batches their requests.

Requests that name different adapters are gathered for a few milliseconds and run
through one backbone call: each adapter prepares its own edits (``prepare_tower``),
requests whose edits fit together (same input shapes, same inserted token counts)
are stacked along the batch, deltas an adapter does not make are zeros, and each
adapter maps its own rows of the result (``finish_tower``). A group that fails is
rerun request by request, so one bad request never fails another client's.

Endpoints: ``GET /v1/adapters``; ``POST /v1/adapters/{name}/embed`` (pixels as
``inputs/image.pixels`` or ``texts`` in the metadata) → ``embeds`` ``[B, E]``;
``POST /v1/adapters/{name}/classify`` (pixels and ``classes``) → ``logits`` ``[B, C]``.

Example:
    >>> host = AdapterHost(handle, {"fashion": "runs/fashion-dga"})
    >>> host.submit("fashion", "image", {"image.pixels": pixels}).result()   # [B, E]
    >>> host.close()                                 # stops the batching thread
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request, Response

from graytune.access import LocalHandle
from graytune.access.owner import DeadlineExceeded, deadline
from graytune.access.wire import INPUTS, encode, read_request, tensor_name, unpack_inputs
from graytune.adapters import TowerRequest
from graytune.artifacts import load_adapter
from graytune.errors import GraytuneError, InvalidInputError, UnknownNameError
from graytune.model import AdaptedModel

log = logging.getLogger(__name__)
Tensor = torch.Tensor


class HostClosed(GraytuneError):
    """A request to an ``AdapterHost`` that was closed (the server is shutting down)."""


class HostBusy(GraytuneError):
    """A request to an ``AdapterHost`` whose queue is full (answered with 503)."""


@dataclass
class _Job:
    model: AdaptedModel
    modality: str
    inputs: dict[str, Tensor] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)
    future: Future = field(default_factory=Future)
    request: TowerRequest | None = None
    until: float = float("inf")  # its deadline (time.monotonic()); the batch stops at the latest one

    @property
    def size(self) -> int:
        return len(self.texts) if self.texts else int(next(iter(self.inputs.values())).shape[0])


class AdapterHost:
    """Trained adapters around one handle, and the thread that batches their requests."""

    def __init__(self, handle: LocalHandle, folders: Mapping[str, str], window_ms: float = 5.0,
                 max_batch: int = 256, lock: Any = None, max_pending: int = 1024) -> None:
        self.handle, self.window_s, self.max_batch = handle, window_ms / 1000, max_batch
        self.max_pending = max_pending
        self.models: dict[str, AdaptedModel] = {}
        for name, folder in folders.items():
            self.models[name] = load_adapter(folder, handle).eval().requires_grad_(False)
        self.backbone_calls = 0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = lock or threading.Lock()  # the server's compute lock: one backbone call at a time
        self._closed, self._closing = False, threading.Lock()  # no request is queued after the stop mark
        self.thread = threading.Thread(target=self._loop, daemon=True, name="graytune-adapter-batcher")
        self.thread.start()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the batching thread after the batch it is running; every request not yet run gets ``HostClosed``."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)  # wakes the thread if it waits for work
        self.thread.join(timeout_s)
        while not self._queue.empty():
            _fail([self._queue.get_nowait()])
        if self.thread.is_alive():  # still finishing its batch (the join timed out): it stops at the next mark
            self._queue.put(None)

    def model(self, name: str) -> AdaptedModel:
        if name not in self.models:
            raise UnknownNameError("hosted adapter", name, self.models)
        return self.models[name]

    def submit(self, name: str, modality: str, inputs: Mapping[str, Tensor] | None = None,
               texts: Sequence[str] = (), until: float = float("inf")) -> Future:
        """Queue one request; its future gives ``[B, E]`` adapted embeddings (not normalised),
        ``DeadlineExceeded`` past ``until`` (``time.monotonic()``), or ``HostClosed`` once the host is closed.
        ``HostBusy`` when ``max_pending`` requests already wait."""
        model = self.model(name)
        if modality == "text":
            job = _Job(model, "text", texts=list(texts), until=until)
            self.handle.tokenize(job.texts[:1])  # the text checks, before any compute
        else:
            job = _Job(model, "image", inputs=dict(inputs or {}), until=until)
            self.handle.check(job.inputs, outputs=["image.embeds"])
        if self._queue.qsize() >= self.max_pending:
            raise HostBusy(f"{self.max_pending} hosted-adapter requests already wait; retry shortly")
        with self._closing:
            if self._closed:
                job.future.set_exception(_closed())
            else:
                self._queue.put(job)
        return job.future

    def _loop(self) -> None:
        while True:
            jobs = self._next_batch()
            if self._closed:
                _fail(jobs)
                return
            now = time.monotonic()
            for job in jobs:
                if job.until <= now:  # its caller already had its 504
                    job.future.set_exception(DeadlineExceeded("the request ran past its deadline before it ran"))
            jobs = [j for j in jobs if j.until > now]
            if not jobs:
                continue
            until = max(j.until for j in jobs)
            with self._lock, torch.no_grad(), deadline(None if until == float("inf") else until):
                self.run(jobs)

    def _next_batch(self) -> list[_Job]:
        """The next job and those that arrive within the batching window after it (none once closed)."""
        first = self._queue.get()
        jobs = [] if first is None else [first]
        deadline = time.monotonic() + self.window_s
        while jobs and not self._closed and sum(j.size for j in jobs) < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is not None:
                jobs.append(job)
        return jobs

    def run(self, jobs: list[_Job]) -> None:
        """Answer ``jobs``: compatible ones share one backbone call."""
        texts = [j for j in jobs if j.modality == "text"]
        if texts:  # one tokenization pads every text request to the same length
            ids = self.handle.tokenize([t for j in texts for t in j.texts])
            start = 0
            for job in texts:
                job.inputs = {k: v[start:start + len(job.texts)] for k, v in ids.items()}
                start += len(job.texts)
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            try:
                job.request = job.model.prepare_tower(job.modality, job.inputs)
                groups.setdefault(_signature(job.request), []).append(job)
            except Exception as err:  # noqa: BLE001 - handed to that request's caller
                job.future.set_exception(err)
        for group in groups.values():
            try:
                self._run_group(group)
            except Exception as err:  # noqa: BLE001 - isolate the request that broke the batch
                if len(group) == 1:
                    group[0].future.set_exception(err)
                    continue
                for job in group:
                    try:
                        self._run_group([job])
                    except Exception as own:  # noqa: BLE001 - that request's own error, for its caller
                        job.future.set_exception(own)

    def _run_group(self, group: list[_Job]) -> None:
        requests = [j.request for j in group]
        sizes = [j.size for j in group]
        inputs = {k: torch.cat([r.inputs[k] for r in requests]) for k in requests[0].inputs}
        add = {port: torch.cat(_stacked([r.add.get(port) for r in requests], sizes))
               for port in sorted({p for r in requests for p in r.add})}
        port = f"{group[0].modality}.embeds"

        def embeds(inserts: list[dict[str, Tensor]]) -> tuple[Tensor, ...]:
            insert = {p: torch.cat([i[p].expand(n, -1, -1) for i, n in zip(inserts, sizes)]) for p in inserts[0]}
            self.backbone_calls += 1
            return self.handle.forward(inputs, add=add, insert=insert, outputs=[port])[port].split(sizes)

        plain = embeds([r.insert for r in requests])
        if requests[0].gate is not None:  # gated tokens (dga-id, lga-id): a second call with them, mixed
            plain = tuple(r.mix(a, b) for r, a, b in zip(requests, plain, embeds([r.all_inserts() for r in requests])))
        answers = [job.model.finish_tower(job.modality, rows) for job, rows in zip(group, plain)]
        for job, answer in zip(group, answers):  # all or none: a failing group is rerun request by request
            job.future.set_result(answer)


def _closed() -> HostClosed:
    return HostClosed("the adapter host was closed (the server is shutting down) before this request ran; "
                      "send it again to a running server")


def _fail(jobs: Sequence[_Job | None]) -> None:
    for job in jobs:
        if job is not None and not job.future.done():
            job.future.set_exception(_closed())


def _signature(request: TowerRequest) -> tuple:
    """Requests with equal signatures can share one backbone call."""
    shapes = tuple(sorted((k, tuple(v.shape[1:])) for k, v in request.inputs.items()))
    inserts = tuple(sorted((k, tuple(v.shape[1:])) for k, v in request.insert.items()))
    gated = tuple(sorted((k, tuple(v.shape[1:])) for k, v in request.gated.items()))
    return request.modality, shapes, inserts, gated


def _stacked(deltas: list[Tensor | None], sizes: list[int]) -> list[Tensor]:
    """Each request's delta as ``[n_i, *S]`` with one common ``S``; zeros where a request adds nothing."""
    present = [d for d in deltas if d is not None]
    rank = max(d.dim() for d in present)
    shaped = [d.reshape((1,) * (rank - d.dim()) + tuple(d.shape)) for d in present]
    tail = torch.broadcast_shapes(*[tuple(d.shape[1:]) for d in shaped])
    out = []
    for delta, n in zip(deltas, sizes):
        if delta is None:
            out.append(present[0].new_zeros((n, *tail)))
        else:
            delta = delta.reshape((1,) * (rank - delta.dim()) + tuple(delta.shape))
            out.append(delta.expand(n, *tail))
    return out


def install_adapters(app: FastAPI, service: Any) -> None:
    """Add the hosted-adapter routes to the service's app."""
    from graytune.serve.admission import busy, check_prompts, check_texts, check_work
    from graytune.serve.app import WIRE_MEDIA

    config = service.config
    folders = dict(_name_folder(item) for item in config.adapters)
    host = AdapterHost(service.handle, folders, config.batch_window_ms, config.max_batch, service.compute_lock,
                       max_pending=4 * config.max_batch)
    app.state.adapters = host
    app.state.on_close.append(host.close)

    @app.exception_handler(HostBusy)
    async def host_busy(_: Request, err: HostBusy) -> Response:
        from graytune.serve.app import answer

        return answer(busy(1.0, str(err)))

    def admit(client: str, name: str, body: bytes, until: float, classify: bool) -> tuple[Future, int, dict]:
        """Checks, admission and the quota charge of one request (on a checks thread), then its job queued."""
        message = read_request(body)
        meta = message[1]
        host.model(name)
        if classify:  # the prompts it will build: their characters before they are built, then their tokens
            classes = _texts(meta.get("classes"))
            check_texts(classes, config, "classes")
            template = str(meta.get("template", TEMPLATE))
            check_prompts(classes, template, config)
            meta["prompts"] = [template.replace("{}", c) for c in classes]
            check_work(service.handle.tokenize(meta["prompts"]), {}, config, grad=False)
        if meta.get("texts") is not None:
            texts = _texts(meta["texts"])
            check_texts(texts, config)
            check_work(service.handle.tokenize(texts), {}, config, grad=False)
            rows, job = len(texts), ("text", None, texts)
        else:
            pixels = unpack_inputs(message)
            if set(pixels) != {"image.pixels"}:
                raise InvalidInputError(f"send {tensor_name(INPUTS, 'image.pixels')}, or texts in the metadata")
            check_work(pixels, {}, config, grad=False)
            rows, job = int(pixels["image.pixels"].shape[0]), ("image", pixels, ())
        service.ledger.charge(client, rows)
        try:
            return host.submit(name, job[0], job[1], texts=job[2], until=until), rows, meta
        except BaseException:
            service.ledger.refund(client, rows)
            raise

    async def embeds_for(name: str, request: Request, until: float, classify: bool = False
                         ) -> tuple[Tensor, dict[str, Any]]:
        client = service.client(request)
        async with service.body(request) as body:
            future, rows, meta = await service.checked(admit, client, name, body, until, classify)
            try:
                return await _wait(future, until, config.request_timeout_s), meta
            except BaseException:
                await service.refund(client, samples=rows)
                raise

    @app.get("/v1/adapters")
    async def listing(request: Request) -> dict[str, Any]:
        service.client(request)
        return {name: {"method": m.method, "backbone": service.handle.spec.id} for name, m in host.models.items()}

    @app.post("/v1/adapters/{name}/embed")
    async def embed(name: str, request: Request) -> Response:
        embeds, _ = await embeds_for(name, request, service.deadline())
        return Response(encode({"embeds": embeds}), media_type=WIRE_MEDIA)

    @app.post("/v1/adapters/{name}/classify")
    async def classify(name: str, request: Request) -> Response:
        until = service.deadline()
        embeds, meta = await embeds_for(name, request, until, classify=True)  # its prompts were admitted with it
        prompts = meta["prompts"]
        text = await _wait(await service.checked(lambda: host.submit(name, "text", texts=prompts, until=until)),
                           until, config.request_timeout_s)
        logits = host.model(name).similarity(embeds, text)
        return Response(encode({"logits": logits}, {"classes": meta["classes"]}), media_type=WIRE_MEDIA)


TEMPLATE = "a photo of a {}."


def _texts(value: object) -> list[str]:
    from graytune.access import texts_of

    return texts_of(value)


async def _wait(future: Future, until: float, timeout_s: float) -> Tensor:
    from graytune.serve.app import HTTPProblem
    from graytune.serve.service import timed_out

    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), max(0.0, until - time.monotonic()))
    except HostClosed as err:
        raise HTTPProblem(503, "closing", str(err)) from None
    except (TimeoutError, DeadlineExceeded):
        raise timed_out(timeout_s) from None


def _name_folder(item: str) -> tuple[str, str]:
    name, sep, folder = item.partition("=")
    if not sep or not name or not folder:
        raise InvalidInputError(f"--adapter {item!r}: write NAME=FOLDER, e.g. fashion=runs/fashion-dga")
    return name, folder
