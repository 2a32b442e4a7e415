"""Many adapters on one backbone: the server hosts trained adapters and batches their requests.

Requests that name different adapters are gathered for a few milliseconds and run
through one backbone call: each adapter prepares its own edits (``prepare_tower``),
requests whose edits fit together (same input shapes, same inserted token counts)
are stacked along the batch, deltas an adapter does not make are zeros, and each
adapter maps its own rows of the result (``finish_tower``). A group that fails is
rerun request by request, so one bad request never fails another client's.

Their HTTP routes (``/v1/adapters/...``) and ``install_adapters`` are in ``graytune.serve.routes.hosted``.

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
import torch

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
    future: Future[Tensor] = field(default_factory=Future)
    request: TowerRequest | None = None
    until: float = float("inf")  # its deadline (time.monotonic()); the batch stops at the latest one

    @property
    def size(self) -> int:
        return len(self.texts) if self.texts else int(next(iter(self.inputs.values())).shape[0])


class AdapterHost:
    """Trained adapters around one handle, and the thread that batches their requests."""

    def __init__(self, handle: LocalHandle, folders: Mapping[str, str], window_ms: float = 5.0,
                 max_batch: int = 256, lock: threading.Lock | None = None, max_pending: int = 1024) -> None:
        self.handle, self.window_s, self.max_batch = handle, window_ms / 1000, max_batch
        self.max_pending = max_pending
        self.models: dict[str, AdaptedModel] = {}
        self.owners: dict[str, str] = {}  # adapters only one client may see and use (fine-tuning jobs' models)
        self.folders: dict[str, str] = {}  # where each was loaded from
        for name, folder in folders.items():
            self.add(name, folder)
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

    def add(self, name: str, folder: str, owner: str | None = None) -> None:
        """Host the adapter saved in ``folder`` as ``name``; with ``owner``, only that client sees and uses it."""
        self.models[name] = load_adapter(folder, self.handle).eval().requires_grad_(False)
        self.folders[name] = folder
        if owner is not None:
            self.owners[name] = owner

    def visible(self, client: str | None) -> list[str]:
        """The adapters ``client`` may use (every one for ``None``: the owner's own view)."""
        return [n for n in self.models if client is None or self.owners.get(n, client) == client]

    def model(self, name: str, client: str | None = None) -> AdaptedModel:
        """The adapter ``name``; for ``client``, one it may use (another client's is unknown to it: 404)."""
        if name not in self.models or (client is not None and self.owners.get(name, client) != client):
            raise UnknownNameError("hosted adapter", name, self.visible(client))
        return self.models[name]

    def submit(self, name: str, modality: str, inputs: Mapping[str, Tensor] | None = None,
               texts: Sequence[str] = (), until: float = float("inf")) -> Future[Tensor]:
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
