"""The owner's trained adapters, served by name over the one backbone (``graytune serve --adapter NAME=FOLDER``).

- ``GET /v1/adapters`` each hosted adapter's method and backbone;
- ``POST /v1/adapters/{name}/embed`` pixels as ``inputs/image.pixels``, or ``texts`` in the metadata
  → ``embeds`` ``[B, E]``; or JSON ``{"texts": [...]}`` → JSON ``{"embeds": [[...]]}``;
- ``POST /v1/adapters/{name}/classify`` pixels or texts and ``classes`` (and optionally a ``template``)
  → ``logits`` ``[B, C]``, the classes in the metadata; JSON in, JSON out as for ``embed``. Charged one
  sample per row and one per class (each prompt goes through the backbone).

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
from graytune.access.wire import INPUTS, Message, encode, read_request, tensor_name, unpack_inputs
from graytune.errors import InvalidInputError
from graytune.serve.adapters import AdapterHost, HostBusy, HostClosed
from graytune.serve.admission import HTTPProblem, busy, check_prompts, check_texts, check_work, tokens_of
from graytune.serve.ledger import Charge
from graytune.serve.responses import answer, wire_response
from graytune.serve.routes.dependencies import ClientDep, ServiceDep
from graytune.serve.routes.openapi import CLASSIFY_DOC, EMBED_DOC
from graytune.serve.service import Service, timed_out

__all__ = ["TEMPLATE", "HostDep", "adapted_image_embeds", "adapted_text_embeds", "install_adapters", "router"]
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


@router.get("/v1/adapters")
async def listing(service: ServiceDep, host: HostDep, client: ClientDep) -> dict[str, dict[str, str]]:
    """Each hosted adapter's method and backbone, by name: the owner's, and the caller's own fine-tuned models."""
    seen = None if service.is_admin(client) else client
    return {name: {"method": host.models[name].method, "backbone": service.handle.spec.id}
            for name in host.visible(seen)}


@router.post("/v1/adapters/{name}/embed", openapi_extra=EMBED_DOC)
async def embed(name: str, request: Request, service: ServiceDep, host: HostDep, client: ClientDep) -> Response:
    """Adapted embeddings ``[B, E]`` (not normalised) of texts or images, through the hosted adapter ``name``."""
    as_json = _is_json(request)
    embeds, _ = await _embeds(service, host, client, name, request, service.deadline())
    return JSONResponse({"embeds": embeds.tolist()}) if as_json else wire_response(encode({"embeds": embeds}))


@router.post("/v1/adapters/{name}/classify", openapi_extra=CLASSIFY_DOC)
async def classify(name: str, request: Request, service: ServiceDep, host: HostDep, client: ClientDep) -> Response:
    """Scores ``[B, C]`` of texts or images against class names put into a template, through adapter ``name``.

    Charged its rows and its classes: every prompt goes through the backbone as a sample (and its tokens).
    """
    until, as_json = service.deadline(), _is_json(request)
    embeds, meta = await _embeds(service, host, client, name, request, until, classify=True)
    prompts = meta["prompts"]  # admitted (and charged) with the request
    try:
        queued = await service.checked(partial(host.submit, name, "text", texts=prompts, until=until))
        text = await _wait(queued, until, service.config.request_timeout_s)
    except BaseException:
        await service.refund(client, charge=Charge(len(prompts), tokens=meta["prompt_tokens"]))
        raise
    logits = host.model(name).similarity(embeds, text)
    if as_json:
        return JSONResponse({"logits": logits.tolist(), "classes": meta["classes"]})
    return wire_response(encode({"logits": logits}, {"classes": meta["classes"]}))


async def adapted_text_embeds(service: Service, host: AdapterHost, client: str, name: str, texts: list[str],
                              base: bool = False) -> tuple[Tensor, int]:
    """``[B, E]`` embeddings of ``texts`` through the caller's adapter ``name`` (admitted, charged and batched as
    ``embed``'s), or with ``base`` the backbone's own; and the tokens charged (what OpenAI's ``usage`` reports)."""
    until = service.deadline()
    if not base:
        embeds, meta = await _admitted(service, host, client, name, ({}, {"texts": texts}), until, False)
        return embeds, int(meta.get("tokens", 0))
    handle = service.level_handle(None)
    check_texts(texts, service.config)
    tokenized = await service.checked(handle.tokenize, texts)
    check_work(tokenized, {}, service.config, grad=False)
    tokens = tokens_of(tokenized)
    await service.checked(partial(service.ledger.charge, client, len(texts), tokens=tokens))
    def work() -> Tensor:
        with torch.no_grad():
            return handle.encode_text(tokenized)

    try:
        return await service.compute(work, until), tokens
    except BaseException:
        await service.refund(client, charge=Charge(len(texts), tokens=tokens))
        raise


async def adapted_image_embeds(service: Service, host: AdapterHost, client: str, name: str, pixels: Tensor) -> Tensor:
    """``[B, E]`` embeddings of preprocessed ``pixels`` through the caller's adapter ``name`` (as ``embed``'s)."""
    message: Message = ({tensor_name(INPUTS, "image.pixels"): pixels}, {})
    embeds, _ = await _admitted(service, host, client, name, message, service.deadline(), False)
    return embeds


async def _embeds(service: Service, host: AdapterHost, client: str, name: str, request: Request, until: float,
                  classify: bool = False) -> tuple[Tensor, dict[str, Any]]:
    """The adapted embeddings a request asks ``name`` for, and its metadata (with ``prompts`` to classify).

    The body is a graytune safetensors message, or JSON (``Content-Type: application/json``) with texts.
    """
    if _is_json(request):
        payload = await service.json(request)
        if not isinstance(payload, dict):
            raise InvalidInputError(f'send a JSON object, e.g. {{"texts": ["a cat"]}}; got {type(payload).__name__}')
        return await _admitted(service, host, client, name, ({}, payload), until, classify)
    async with service.body(request) as body:
        message = await service.checked(read_request, body)
        return await _admitted(service, host, client, name, message, until, classify)


async def _admitted(service: Service, host: AdapterHost, client: str, name: str, message: Message, until: float,
                    classify: bool) -> tuple[Tensor, dict[str, Any]]:
    queued, charge, meta = await service.checked(_admit, service, host, client, name, message, until, classify)
    try:
        return await _wait(queued, until, service.config.request_timeout_s), meta
    except BaseException:
        await service.refund(client, charge=charge)
        raise


def _admit(service: Service, host: AdapterHost, client: str, name: str, message: Message, until: float,
           classify: bool) -> tuple[Future[Tensor], Charge, dict[str, Any]]:
    """Checks, admission and the quota charge of one request (on a checks thread), then its job queued.

    The charge is every sample the backbone will see: the rows, and for ``classify`` one prompt per class; and
    their tokens (``--quota-tokens``). The prompts' own part is ``meta["prompt_tokens"]``.
    """
    config, meta = service.config, message[1]
    host.model(name, client)
    meta["prompt_tokens"] = tokens = 0
    if classify:  # the prompts it will build: their characters before they are built, then their tokens
        classes = texts_of(meta.get("classes"))
        check_texts(classes, config, "classes")
        template = str(meta.get("template", TEMPLATE))
        check_prompts(classes, template, config)
        meta["prompts"] = [template.replace("{}", c) for c in classes]
        tokenized = service.handle.tokenize(meta["prompts"])
        check_work(tokenized, {}, config, grad=False)
        meta["prompt_tokens"] = tokens = tokens_of(tokenized)
    if meta.get("texts") is not None:
        texts = texts_of(meta["texts"])
        check_texts(texts, config)
        tokenized = service.handle.tokenize(texts)
        check_work(tokenized, {}, config, grad=False)
        tokens += tokens_of(tokenized)
        meta["tokens"] = tokens
        rows, modality, pixels = len(texts), "text", None
    else:
        texts, pixels = [], unpack_inputs(message)
        if set(pixels) != {"image.pixels"}:
            raise InvalidInputError(f"send texts (JSON: {{\"texts\": [...]}}), or images as "
                                    f"{tensor_name(INPUTS, 'image.pixels')} in a graytune safetensors message")
        check_work(pixels, {}, config, grad=False)
        rows, modality = int(pixels["image.pixels"].shape[0]), "image"
    charge = Charge(rows + len(meta.get("prompts", ())), tokens=tokens)
    service.ledger.charge(client, charge.samples, tokens=tokens)
    try:
        return host.submit(name, modality, pixels, texts=texts, until=until), charge, meta
    except BaseException:
        service.ledger.refund(client, charge.samples, tokens=tokens)
        raise


def _is_json(request: Request) -> bool:
    """Whether the body is JSON: ``Content-Type: application/json``, or what ``curl -d`` sends (a form type)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return kind in ("application/json", "application/x-www-form-urlencoded") or kind.startswith("text/")


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
