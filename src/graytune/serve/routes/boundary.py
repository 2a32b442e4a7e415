"""The backbone's own calls across the boundary: tokenize, forward, vector–Jacobian products, sessions.

- ``POST /v1/tokenize`` ``{"texts": [...]}`` → the owner's token ids;
- ``POST /v1/forward`` a safetensors request → outputs, and a session id when gradients are wanted;
- ``POST /v1/vjp`` the outputs' gradients and a session id (or, after 410, the whole forward again)
  → the gradients at the client's tensors;
- ``POST /v1/generate`` a language model's prompt, edits, token maps and settings → the tokens it generates
  (newline-delimited JSON, a line per token, with ``stream``; see ``graytune.serve.generation``);
- ``POST /v1/generate-images`` a diffusion model's prompts, edits and settings → the images the owner samples
  (``[B, 3, H, W]`` float32 in [0, 1]; see ``graytune.serve.images``);
- ``POST /v1/sessions/release`` ``{"session": id}`` release a session the client will not differentiate
  (``DELETE /v1/sessions/{id}`` still works for older clients, but puts the id in URLs and logs).

Each route authenticates, reads its body within the service's limits, decodes and checks it on a
checks thread, charges the quota, and runs the backbone through ``Service.compute``; work that is not
served is refunded.

Example:
    >>> app.include_router(boundary.router)
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

import torch
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from graytune.access import BoundaryCall, texts_of
from graytune.access.generation import pack_generated
from graytune.access.images import ROUTE, pack_images
from graytune.access.wire import check_request_protocol, encode, pack_result, pack_vjp, read_request, request_key
from graytune.errors import InvalidInputError
from graytune.serve.admission import check_texts
from graytune.serve.coalesce import MemberCall, run_forward
from graytune.serve.config import ServeConfig
from graytune.serve.generation import charge_generation, check_queue, plan_generation, run_generation, streamed
from graytune.serve.images import charge_images, plan_images, run_images
from graytune.serve.responses import wire_response
from graytune.serve.routes.dependencies import ClientDep, ServiceDep, get_client
from graytune.serve.routes.openapi import (
    FORWARD_DOC, GENERATE_DOC, GENERATE_IMAGES_DOC, RELEASE_DOC, TOKENIZE_DOC, VJP_DOC,
)

__all__ = ["router"]
Tensor = torch.Tensor
router = APIRouter()


@router.post("/v1/tokenize", dependencies=[Depends(get_client)], openapi_extra=TOKENIZE_DOC)
async def tokenize(request: Request, service: ServiceDep) -> Response:
    """The owner's token ids and attention mask for texts."""
    payload = await service.json(request)
    texts = await service.checked(_tokenize_texts, payload, service.config)
    ids = await service.checked(service.handle.tokenize, texts)
    return wire_response(encode(ids))


@router.post("/v1/forward", openapi_extra=FORWARD_DOC)
async def forward(request: Request, service: ServiceDep, client: ClientDep) -> Response:
    """Run the backbone on the client's inputs and edits; a session id when gradients are wanted."""
    until = service.deadline()
    async with service.body(request) as body:
        message = await service.checked(read_request, body)
        handle, plan = await service.checked(service.plan, client, message)
        charge = await service.checked(service.charge_forward, client, message, plan, handle)
        try:
            if service.joiner is not None:  # --coalesce-ms: it may share a backbone call with other clients'
                values, call = await service.joiner.forward(handle, plan, until)
            else:
                values, call = await service.compute(partial(run_forward, handle, plan), until)
        except BaseException:
            await service.refund(client, charge=charge)
            raise
    session = service.store.put(client, call, call.nbytes, request_key(message)) if call.differentiable else None
    if session is not None and isinstance(call, MemberCall):
        call.forget = partial(service.store.release, client, session)
    return wire_response(pack_result(plan, values, call.values_read, session))


@router.post("/v1/vjp", openapi_extra=VJP_DOC)
async def vjp(request: Request, service: ServiceDep, client: ClientDep) -> Response:
    """The gradients at the client's tensors, from the outputs' gradients (session, or the forward resent)."""
    until = service.deadline()
    async with service.body(request) as body:
        message = await service.checked(read_request, body)
        call, grads, charge = await service.checked(service.vjp_call, client, message)
        try:
            if isinstance(call, MemberCall):  # one backward over the joined call answers its members
                result = await service.joiner.vjp(call, grads, until)
            else:
                result = await service.compute(partial(_run_vjp, call, grads), until)
        except BaseException:
            await service.refund(client, charge=charge)
            raise
    return wire_response(pack_vjp(call.plan, result))


@router.post("/v1/generate", openapi_extra=GENERATE_DOC)
async def generate(request: Request, service: ServiceDep, client: ClientDep) -> Response:
    """Tokens a language model generates after each prompt, the owner decoding (streamed with ``stream``)."""
    until = service.deadline()
    async with contextlib.AsyncExitStack() as stack:
        body = await stack.enter_async_context(service.body(request))
        message = await service.checked(read_request, body)
        job = await service.checked(plan_generation, service, client, message)
        if job.stream:
            check_queue(service)  # a busy backbone answers 503 before the stream's status goes out
        charge = await service.checked(charge_generation, service, client, job)
        if job.stream:  # the body's hold on the in-flight budget goes with the decoding, which releases it
            lines = streamed(service, client, job, charge, until, stack.pop_all())
            return StreamingResponse(lines, media_type="application/x-ndjson")
        result = await run_generation(service, client, job, charge, until)
    return wire_response(pack_generated(result))


@router.post(ROUTE, openapi_extra=GENERATE_IMAGES_DOC)
async def generate_images(request: Request, service: ServiceDep, client: ClientDep) -> Response:
    """Images a diffusion model samples for each prompt, the owner sampling (``graytune.serve.images``)."""
    until = service.deadline()
    async with service.body(request) as body:
        message = await service.checked(read_request, body)
        job = await service.checked(plan_images, service, client, message)
        charge = await service.checked(charge_images, service, client, job)
        images = await run_images(service, client, job, charge, until)
    return wire_response(pack_images(images))


@router.post("/v1/sessions/release", openapi_extra=RELEASE_DOC)
async def release(request: Request, service: ServiceDep, client: ClientDep) -> dict[str, bool]:
    """Free a session that will not be differentiated: ``{"released": true}`` if it was there."""
    payload = await service.json(request)
    session = payload.get("session") if isinstance(payload, dict) else None
    if not isinstance(session, str):
        raise InvalidInputError('send {"session": "<the id the forward answered with>"}')
    return {"released": service.store.release(client, session)}


@router.delete("/v1/sessions/{session}", deprecated=True)
async def release_by_url(session: str, service: ServiceDep, client: ClientDep) -> dict[str, bool]:
    """As ``POST /v1/sessions/release``, for older clients (the id ends up in URLs and logs)."""
    return {"released": service.store.release(client, session)}


def _run_vjp(call: BoundaryCall, grads: list[Tensor | None]) -> tuple[Tensor | None, ...]:
    """The gradients at the client's tensors (backbone thread); a recompute runs its forward first."""
    if not call.output_shapes:  # a recompute: the forward again, then the shapes are known
        call.forward([call.plan.tensor(g, p) for g, p in call.plan.slots])
        call.check_grads(grads)
    return call.vjp(grads)


def _tokenize_texts(payload: Any, config: ServeConfig) -> list[str]:
    if isinstance(payload, dict):
        check_request_protocol(payload)
    texts = payload.get("texts") if isinstance(payload, dict) else None
    if isinstance(texts, list):
        check_texts([t for t in texts if isinstance(t, str)], config)
    return texts_of(texts)
