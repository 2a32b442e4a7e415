"""The owner's side of ``POST /v1/generate``: a language model decodes for a client, checked, charged, streamed.

A generation request is checked as a forward is, before any work (level, grants, the token maps' read grant,
the black-box edits policy, and its size: ``max_new_tokens`` at most ``--max-new-tokens``, and its positions,
rows x (prompt + inserted + new tokens), at most ``--max-tokens``). It is charged before it runs: one sample per
row, and tokens (``--quota-tokens``) for its prompt's real tokens plus ``rows x max_new_tokens`` reserved; once
it is served, the tokens it did not generate are given back, and work not served is refunded whole. The
owner decodes through ``LocalHandle.generate`` under the compute lock and the request's deadline.

Streamed (``stream: true``): the answer is newline-delimited JSON, one ``{"texts": [...]}`` line per generated
token, as ``LocalHandle.generate``'s ``stream`` sees them (one-row prompts), then the whole result, or an error
line ``{"error", "detail", "status"}`` when the work failed after the answer began (a deadline, the context).
A client that goes away stops the decoding at its next token; it is charged the tokens generated until then.

Example:
    >>> job = plan_generation(service, "alice", read_request(body))        # on a checks thread
    >>> charge = charge_generation(service, "alice", job)
    >>> generated = await run_generation(service, "alice", job, charge, service.deadline())
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from graytune.access import CallPlan, LocalHandle
from graytune.access.generation import (
    Generated, check_generation_plan, check_maps, generated_line, stream_line, unpack_generate,
)
from graytune.access.wire import Message
from graytune.serve.admission import busy, check_texts, check_work, too_large, tokens_of
from graytune.serve.edits import note_edits, refuse_edits
from graytune.serve.ledger import Charge
from graytune.serve.requestlog import log_request
from graytune.serve.responses import problem_of
from graytune.serve.service import Service
from graytune.types import Exposure, GenerationSettings

__all__ = ["GenerationJob", "StreamClosed", "charge_generation", "check_queue", "plan_generation", "run_generation",
           "streamed"]
Tensor = torch.Tensor


class StreamClosed(Exception):
    """The client of a streamed generation went away; the owner stops decoding."""


@dataclass
class GenerationJob:
    """One checked generation request: the handle at its level, its checked prompt and edits, maps, settings."""

    handle: LocalHandle
    plan: CallPlan
    maps: dict[str, dict[str, Tensor]]
    settings: GenerationSettings
    stream: bool
    streamed_tokens: list[int] = field(default_factory=lambda: [0])  # tokens sent to a streaming client so far

    @property
    def rows(self) -> int:
        return int(self.plan.inputs["text.input_ids"].shape[0])


def plan_generation(service: Service, client: str, message: Message) -> GenerationJob:
    """The checked generation ``message`` asks for (nothing charged, nothing run): 400 for bad settings or
    input, 403 above the level or grants (or black-box edits the owner refuses), 413 past a limit."""
    asked = unpack_generate(message)
    handle, config = service.level_handle(asked.call.access), service.config
    new = asked.settings.max_new_tokens
    if new > config.max_new_tokens:
        raise too_large(f"max_new_tokens={new:,} per row was asked", config.max_new_tokens, "--max-new-tokens",
                        "ask fewer new tokens per request")
    inputs: dict[str, Any] = dict(asked.call.inputs)
    if asked.call.texts is not None:
        check_texts(asked.call.texts, config)
        inputs["text"] = asked.call.texts
    check_work(inputs, asked.call.insert, config, grad=False, new_tokens=new)  # ids, before texts are tokenized
    with torch.no_grad():
        plan = handle.check(inputs, asked.call.add, asked.call.insert, [], [])
        check_generation_plan(handle.spec, plan)
        maps = check_maps(handle.spec, handle.access, handle.grants, asked.maps, Exposure(access=handle.access))
    check_work(plan.inputs, plan.insert, config, grad=False, new_tokens=new)
    refuse_edits(service.edits_policy, handle, plan)
    return GenerationJob(handle, plan, maps, asked.settings, asked.stream)


def charge_generation(service: Service, client: str, job: GenerationJob) -> Charge:
    """Charge a checked generation before it runs: its rows, its prompt's tokens and ``rows x max_new_tokens``
    (``run_generation`` gives back what was not generated); 429 past a quota. A black-box edit is then recorded
    as ``--black-box-edits count`` says."""
    tokens = tokens_of(job.plan.inputs) + job.rows * job.settings.max_new_tokens
    service.ledger.charge(client, job.rows, tokens=tokens)
    note_edits(service.ledger, client, job.handle, job.plan, service.edits_policy)
    return Charge(samples=job.rows, tokens=tokens)


async def run_generation(service: Service, client: str, job: GenerationJob, charge: Charge, until: float,
                         on_texts: Callable[[list[str]], None] | None = None) -> Generated:
    """Decode ``job`` on the backbone by ``until`` and settle its charge (see the module's docstring)."""
    try:
        result = await service.compute(partial(_generate, job, on_texts), until)
    except StreamClosed:
        unused = job.rows * job.settings.max_new_tokens - job.streamed_tokens[0]
        await service.refund(client, charge=Charge(tokens=unused))
        raise
    except BaseException:
        await service.refund(client, charge=charge)
        raise
    unused = job.rows * job.settings.max_new_tokens - int(result.lengths.sum())
    if unused > 0:
        await service.refund(client, charge=Charge(tokens=unused))
    return result


def _generate(job: GenerationJob, on_texts: Callable[[list[str]], None] | None) -> Generated:
    plan = job.plan
    return job.handle.generate(plan.inputs, add=plan.add, insert=plan.insert, maps=job.maps, settings=job.settings,
                               stream=on_texts)


def check_queue(service: Service) -> None:
    """503 now, before a streamed answer begins, when the backbone's queue is full (``Service.compute``'s test)."""
    if service.queued > service.config.max_queue:
        raise busy(service.compute_s * service.queued, f"{service.queued} requests wait for the backbone "
                   "(--max-queue)")


def streamed(service: Service, client: str, job: GenerationJob, charge: Charge, until: float,
             held: contextlib.AsyncExitStack) -> AsyncIterator[bytes]:
    """Start decoding ``job`` now and answer its lines: each token's texts as the owner decodes, then the result
    or an error. The decoding runs (and settles its charge) even if the answer is never read; ``held`` (the
    request body's hold on the in-flight budget) is closed when it ends."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[list[str] | None] = asyncio.Queue()
    gone = threading.Event()

    def on_texts(texts: list[str]) -> None:  # on the backbone's thread
        if gone.is_set():
            raise StreamClosed
        job.streamed_tokens[0] += 1
        loop.call_soon_threadsafe(lines.put_nowait, texts)

    def finished(task: asyncio.Future[Generated]) -> None:  # on the event loop, after every line it queued
        lines.put_nowait(None)
        if not task.cancelled():
            task.exception()  # read here, so that a client that left early leaves no warning behind
        closing = loop.create_task(held.aclose())
        _CLOSING.add(closing)
        closing.add_done_callback(_CLOSING.discard)

    task = asyncio.ensure_future(run_generation(service, client, job, charge, until, on_texts))
    task.add_done_callback(finished)
    return _lines(service, client, task, lines, gone)


async def _lines(service: Service, client: str, task: asyncio.Future[Generated],
                 lines: asyncio.Queue[list[str] | None], gone: threading.Event) -> AsyncIterator[bytes]:
    try:
        while (texts := await lines.get()) is not None:
            yield stream_line({"texts": texts})
        try:
            yield generated_line(task.result())
        except Exception as err:  # the answer's status went out already: the error is its last line
            problem = problem_of(err, service)
            log_request(client, "POST", "/v1/generate", problem.status, f"{problem.kind}: {problem.detail} "
                        "(streamed: the answer's last line)")
            yield stream_line({"error": problem.kind, "detail": problem.detail, "status": problem.status})
    finally:
        gone.set()  # a client that went away stops the decoding at its next token


_CLOSING: set[asyncio.Task[None]] = set()  # body holds being released (a task needs a reference until it ends)
