"""The owner's trained adapters, served by name over the one backbone (``graytune serve --adapter NAME=FOLDER``).

- ``GET /v1/adapters`` each hosted adapter's method and backbone;
- ``POST /v1/adapters/{name}/embed`` pixels as ``inputs/image.pixels``, or ``texts`` in the metadata
  → ``embeds`` ``[B, E]``;
- ``POST /v1/adapters/{name}/classify`` pixels and ``classes`` (and optionally a ``template``)
  → ``logits`` ``[B, C]``, the classes in the metadata. Charged one sample per row and one per class
  (each prompt goes through the backbone).

A request is checked, admitted and charged on a checks thread, then queued on the ``AdapterHost``
(``graytune.serve.adapters``), which batches requests for different adapters into one backbone call.

Example:
    >>> app = create_app(handle, ServeConfig(adapters=("fashion=runs/fashion-dga",)), keys, extra=install_adapters)
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from functools import partial
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from graytune.access import texts_of
from graytune.access.owner import DeadlineExceeded
from graytune.access.wire import INPUTS, encode, read_request, tensor_name, unpack_inputs
from graytune.errors import InvalidInputError
from graytune.serve.adapters import AdapterHost, HostBusy, HostClosed
from graytune.serve.admission import HTTPProblem, busy, check_prompts, check_texts, check_work
from graytune.serve.responses import answer, wire_response
from graytune.serve.routes.dependencies import ClientDep, ServiceDep, get_client
from graytune.serve.service import Service, timed_out

__all__ = ["TEMPLATE", "HostDep", "install_adapters", "router"]
Tensor = torch.Tensor
#: the prompt a class name is put into when a classify request names no ``template``
TEMPLATE = "a photo of a {}."


def install_adapters(app: FastAPI, service: Service) -> None:
    """Host the adapters ``service.config.adapters`` names (``NAME=FOLDER``) and add their routes to ``app``."""
    config = service.config
    folders = dict(_name_folder(item) for item in config.adapters)
    host = AdapterHost(service.handle, folders, config.batch_window_ms, config.max_batch, service.compute_lock,
                       max_pending=4 * config.max_batch)
    app.state.adapters = host
    app.state.on_close.append(host.close)
    app.add_exception_handler(HostBusy, _host_busy)
    app.include_router(router)


async def get_adapter_host(request: Request) -> AdapterHost:
    """The adapter host ``install_adapters`` made for this app."""
    host: AdapterHost = request.app.state.adapters
    return host


HostDep = Annotated[AdapterHost, Depends(get_adapter_host)]
router = APIRouter()


@router.get("/v1/adapters", dependencies=[Depends(get_client)])
async def listing(service: ServiceDep, host: HostDep) -> dict[str, dict[str, str]]:
    return {name: {"method": m.method, "backbone": service.handle.spec.id} for name, m in host.models.items()}


@router.post("/v1/adapters/{name}/embed")
async def embed(name: str, request: Request, service: ServiceDep, host: HostDep, client: ClientDep) -> Response:
    embeds, _ = await _embeds(service, host, client, name, request, service.deadline())
    return wire_response(encode({"embeds": embeds}))


@router.post("/v1/adapters/{name}/classify")
async def classify(name: str, request: Request, service: ServiceDep, host: HostDep, client: ClientDep) -> Response:
    until = service.deadline()
    embeds, meta = await _embeds(service, host, client, name, request, until, classify=True)
    prompts = meta["prompts"]  # admitted (and charged) with the request
    try:
        queued = await service.checked(partial(host.submit, name, "text", texts=prompts, until=until))
        text = await _wait(queued, until, service.config.request_timeout_s)
    except BaseException:
        await service.refund(client, samples=len(prompts))
        raise
    logits = host.model(name).similarity(embeds, text)
    return wire_response(encode({"logits": logits}, {"classes": meta["classes"]}))


async def _embeds(service: Service, host: AdapterHost, client: str, name: str, request: Request, until: float,
                  classify: bool = False) -> tuple[Tensor, dict[str, Any]]:
    """The adapted embeddings a request asks ``name`` for, and its metadata (with ``prompts`` to classify)."""
    async with service.body(request) as body:
        queued, rows, meta = await service.checked(_admit, service, host, client, name, body, until, classify)
        try:
            return await _wait(queued, until, service.config.request_timeout_s), meta
        except BaseException:
            await service.refund(client, samples=rows + len(meta.get("prompts", ())))
            raise


def _admit(service: Service, host: AdapterHost, client: str, name: str, body: bytes, until: float,
           classify: bool) -> tuple[Future[Tensor], int, dict[str, Any]]:
    """Checks, admission and the quota charge of one request (on a checks thread), then its job queued.

    The charge is every sample the backbone will see: the rows, and for ``classify`` one prompt per class.
    """
    config = service.config
    message = read_request(body)
    meta = message[1]
    host.model(name)
    if classify:  # the prompts it will build: their characters before they are built, then their tokens
        classes = texts_of(meta.get("classes"))
        check_texts(classes, config, "classes")
        template = str(meta.get("template", TEMPLATE))
        check_prompts(classes, template, config)
        meta["prompts"] = [template.replace("{}", c) for c in classes]
        check_work(service.handle.tokenize(meta["prompts"]), {}, config, grad=False)
    if meta.get("texts") is not None:
        texts = texts_of(meta["texts"])
        check_texts(texts, config)
        check_work(service.handle.tokenize(texts), {}, config, grad=False)
        rows, modality, pixels = len(texts), "text", None
    else:
        texts, pixels = [], unpack_inputs(message)
        if set(pixels) != {"image.pixels"}:
            raise InvalidInputError(f"send {tensor_name(INPUTS, 'image.pixels')}, or texts in the metadata")
        check_work(pixels, {}, config, grad=False)
        rows, modality = int(pixels["image.pixels"].shape[0]), "image"
    charged = rows + len(meta.get("prompts", ()))
    service.ledger.charge(client, charged)
    try:
        return host.submit(name, modality, pixels, texts=texts, until=until), rows, meta
    except BaseException:
        service.ledger.refund(client, charged)
        raise


async def _wait(queued: Future[Tensor], until: float, timeout_s: float) -> Tensor:
    """The result of a queued request by ``until``: 504 past it, 503 if the host closes first."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(queued), max(0.0, until - time.monotonic()))
    except HostClosed as err:
        raise HTTPProblem(503, "closing", str(err)) from None
    except (TimeoutError, DeadlineExceeded):
        raise timed_out(timeout_s) from None


async def _host_busy(_: Request, err: HostBusy) -> JSONResponse:
    return answer(busy(1.0, str(err)))


def _name_folder(item: str) -> tuple[str, str]:
    name, sep, folder = item.partition("=")
    if not sep or not name or not folder:
        raise InvalidInputError(f"--adapter {item!r}: write NAME=FOLDER, e.g. fashion=runs/fashion-dga")
    return name, folder
