"""OpenAI's ``/v1/completions`` and ``/v1/chat/completions`` for language-model jobs' models (and the backbone).

``model`` is a fine-tuned model of the caller's (a hosted adapter: its shift, inserted tokens or AdaLink map act
as in training, and reach the generated tokens too) or the served backbone's id (zero-shot). The owner decodes
with a key-value cache under the compute lock and the request's deadline, checked and charged as ``/v1/generate``
is (``graytune.serve.generation``): ``max_tokens`` at most ``--max-new-tokens``, one sample per prompt, the
prompt's tokens plus ``max_tokens`` reserved and what was not generated given back. Chat messages are rendered
with the backbone's own chat template. Sampling: ``temperature`` (0: greedy, OpenAI's default of 1 otherwise),
``top_p``, ``seed``. Refused, saying so: ``n`` other than 1, ``stream``, ``stop``, ``logprobs``.

Example:
    >>> client.completions.create(model="ft:smollm2-135m:prompt:alice:…", prompt="Word:", max_tokens=4)
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import torch
from fastapi import APIRouter, Request

from graytune.access.generation import check_generation_plan
from graytune.methods import backbone_kind
from graytune.model import AdaptedModel
from graytune.serve.admission import HTTPProblem, check_texts, check_work, too_large
from graytune.serve.generation import GenerationJob, charge_generation, run_generation
from graytune.serve.routes.dependencies import ClientDep, ServiceDep
from graytune.serve.service import Service
from graytune.train.completions import render_chat
from graytune.types import GenerationSettings

__all__ = ["router"]
router = APIRouter()
REFUSED = {"n": 1, "stream": False, "stop": None, "logprobs": None, "echo": False, "best_of": 1, "suffix": None,
           "tools": None, "response_format": None}


@router.post("/v1/completions")
async def completions(request: Request, service: ServiceDep, client: ClientDep) -> dict[str, Any]:
    body = await _body(service, request)
    prompts = body.get("prompt")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise HTTPProblem(400, "invalid_input", "prompt is a string or a list of strings (token ids are not taken)")
    name, texts, usage = await _generate(request, service, client, body, prompts)
    choices = [{"text": text, "index": i, "logprobs": None, "finish_reason": reason}
               for i, (text, reason) in enumerate(texts)]
    return {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": int(time.time()),
            "model": name, "choices": choices, "usage": usage}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, service: ServiceDep, client: ClientDep) -> dict[str, Any]:
    body = await _body(service, request)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise HTTPProblem(400, "invalid_input", 'messages is a list of {"role": ..., "content": "text"}')
    text_spec = service.handle.spec.preprocess.get("text", {})
    template = text_spec.get("chat_template")
    if not template:
        raise HTTPProblem(400, "invalid_input", f"{service.handle.spec.id} publishes no chat template; use "
                          "/v1/completions with the prompt written as the model expects it")
    check_texts([m["content"] for m in messages], service.config)
    prompt = render_chat(template, [{"role": m["role"], "content": m["content"]} for m in messages], text_spec)
    name, texts, usage = await _generate(request, service, client, body, [prompt])
    choices = [{"index": 0, "message": {"role": "assistant", "content": texts[0][0]}, "logprobs": None,
                "finish_reason": texts[0][1]}]
    return {"id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion", "created": int(time.time()),
            "model": name, "choices": choices, "usage": usage}


async def _body(service: Service, request: Request) -> dict[str, Any]:
    body = await service.json(request)
    if not isinstance(body, dict):
        raise HTTPProblem(400, "invalid_input", 'send a JSON object such as {"model": ..., "prompt": "..."}')
    if backbone_kind(service.handle.spec) != "causal-lm":
        raise HTTPProblem(400, "invalid_input", f"{service.handle.spec.id} is not a language model; it answers "
                          "/v1/embeddings")
    for key, allowed in REFUSED.items():
        if body.get(key, allowed) not in (allowed, None):
            raise HTTPProblem(400, "invalid_input", f"{key}={body[key]!r} is not served here (only {allowed!r}); "
                              "drop it")
    return body


async def _generate(request: Request, service: Service, client: str, body: dict[str, Any],
                    prompts: list[str]) -> tuple[str, list[tuple[str, str]], dict[str, int]]:
    """Decode ``prompts`` with the model ``body`` names; each text with its finish reason, and the usage."""
    name = body.get("model")
    model = _model(request, service, client, name)
    settings = _settings(body, service)
    job = await service.checked(_plan, service, model, prompts, settings)
    charge = await service.checked(charge_generation, service, client, job)
    result = await run_generation(service, client, job, charge, service.deadline())
    lengths = result.lengths.tolist()
    reasons = ["length" if n >= settings.max_new_tokens else "stop" for n in lengths]
    prompt_tokens = int(job.plan.inputs["text.attention_mask"].sum()) if "text.attention_mask" in job.plan.inputs \
        else int(job.plan.inputs["text.input_ids"].numel())
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": int(sum(lengths)),
             "total_tokens": prompt_tokens + int(sum(lengths))}
    return str(name), list(zip(result.texts, reasons)), usage


def _model(request: Request, service: Service, client: str, name: Any) -> AdaptedModel:
    if name == service.handle.spec.id:
        return AdaptedModel.build(service.handle, "zero-shot")
    host = request.app.state.adapters
    if str(name) not in host.visible(client):  # another client's model answers as an unknown one
        raise HTTPProblem(404, "not_found", f"no model {name!r} among yours; GET /v1/models lists them")
    model: AdaptedModel = host.model(str(name), client)
    return model


def _settings(body: dict[str, Any], service: Service) -> GenerationSettings:
    new = body.get("max_completion_tokens", body.get("max_tokens", 16))
    if isinstance(new, int) and new > service.config.max_new_tokens:
        raise too_large(f"max_tokens={new:,} was asked", service.config.max_new_tokens, "--max-new-tokens",
                        "ask fewer tokens")
    seed = body.get("seed")
    return GenerationSettings(max_new_tokens=new, temperature=body.get("temperature", 1.0),
                              top_p=body.get("top_p", 1.0), seed=0 if seed is None else seed)


def _plan(service: Service, model: AdaptedModel, prompts: list[str], settings: GenerationSettings) -> GenerationJob:
    config, handle = service.config, model.handle
    check_texts(prompts, config)
    tokens = handle.tokenize(prompts)
    check_work(tokens, {}, config, grad=False, new_tokens=settings.max_new_tokens)
    with torch.no_grad():
        request, maps = model.decoding_edits(tokens)
        plan = handle.check(request.inputs, request.add, request.insert, [], [])
        check_generation_plan(handle.spec, plan)
    check_work(plan.inputs, plan.insert, config, grad=False, new_tokens=settings.max_new_tokens)
    return GenerationJob(handle, plan, maps, settings, stream=False)
