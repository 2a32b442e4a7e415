"""OpenAI's ``POST /v1/embeddings`` on ``graytune serve --jobs``: a fine-tuned model's embeddings, or the backbone's.

``model`` is a fine-tuned model of the caller's (its adapted embeddings, through the adapter host that batches
hosted adapters into shared backbone calls) or the served backbone's id (its own embeddings). ``input`` is a
string or a list of strings, as OpenAI's; graytune's extension for image towers: a list of
``{"image": "<base64 PNG or JPEG>"}`` objects (``extra_body`` is not needed: the SDK passes ``input`` through),
preprocessed as the model's training images were (its artifact's size, fit, mean and std). Vectors come as
floats or, as the openai SDK asks by default, base64 little-endian float32; they are not normalised. Charged as
``/v1/adapters/{name}/embed``: a sample per row, and tokens for texts.

Example:
    >>> client.embeddings.create(model="ft:minilm:dga:alice:…", input=["a cat", "a car"])
    >>> client.embeddings.create(model="ft:…", input=[{"image": base64.b64encode(png).decode()}])
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import torch
from fastapi import APIRouter, Request
from PIL import Image, UnidentifiedImageError

from graytune.artifacts import read_config
from graytune.data.images import ImagePreprocess
from graytune.serve.admission import HTTPProblem
from graytune.serve.routes.dependencies import ClientDep, ServiceDep
from graytune.serve.routes.hosted import adapted_image_embeds, adapted_text_embeds
from graytune.serve.service import Service

__all__ = ["MAX_IMAGE_SIDE", "router"]
router = APIRouter()
#: the longest side an uploaded image may have before it is decoded (a decompression bomb is refused unread)
MAX_IMAGE_SIDE = 4096


@router.post("/v1/embeddings")
async def embeddings(request: Request, service: ServiceDep, client: ClientDep) -> dict[str, Any]:
    """OpenAI's embeddings (see the module's docstring)."""
    body = await service.json(request)
    if not isinstance(body, dict):
        raise HTTPProblem(400, "invalid_input", 'send {"model": ..., "input": ["a text", ...]}')
    fmt, name, host = body.get("encoding_format", "float"), body.get("model"), request.app.state.adapters
    base = name == service.handle.spec.id
    if not base and str(name) not in host.visible(client):
        raise HTTPProblem(404, "not_found", f"no model {name!r} among yours; GET /v1/models lists them")
    if fmt not in ("float", "base64"):
        raise HTTPProblem(400, "invalid_input", f"encoding_format is {fmt!r}; use float or base64")
    items = body.get("input")
    items = [items] if isinstance(items, str | dict) else items
    if isinstance(items, list) and items and all(isinstance(i, dict) for i in items):
        if base:
            raise HTTPProblem(400, "invalid_input", "images are embedded through a fine-tuned model; the backbone's "
                              "own image embeddings come from /v1/forward")
        pixels = await service.checked(_pixels, items, service, host.folders[str(name)])
        vectors, tokens = await adapted_image_embeds(service, host, client, str(name), pixels), 0
    elif isinstance(items, list) and items and all(isinstance(i, str) for i in items):
        vectors, tokens = await adapted_text_embeds(service, host, client, str(name), items, base=base)
    else:
        raise HTTPProblem(400, "invalid_input", f"input is {str(body.get('input'))[:80]!r}; give a string, a list of "
                          'strings, or a list of {"image": "<base64 PNG or JPEG>"} (token ids are not taken)')
    if body.get("dimensions") not in (None, vectors.shape[1]):
        raise HTTPProblem(400, "invalid_input", f"dimensions is {body['dimensions']!r}; {name} embeds in "
                          f"{vectors.shape[1]} dimensions and does not shorten them")
    rows = vectors.detach().cpu().numpy().astype("<f4")
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(row.tobytes()).decode() if fmt == "base64" else row.tolist()}
            for i, row in enumerate(rows)]
    return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _pixels(items: list[dict[str, Any]], service: Service, folder: str) -> torch.Tensor:
    """``[B, 3, S, S]`` pixels of base64 images, preprocessed as the artifact's training images were."""
    if len(items) > service.config.max_texts:
        raise HTTPProblem(413, "too_large", f"{len(items):,} images in one request; the server takes at most "
                          f"{service.config.max_texts:,} (--max-texts); send fewer")
    saved = read_config(folder).get("preprocess")
    pre = ImagePreprocess(saved["image_size"], saved["fit"], tuple(saved["mean"]), tuple(saved["std"])) \
        if saved else ImagePreprocess.from_spec(service.handle.spec)
    return pre([_image(item, n) for n, item in enumerate(items)])


def _image(item: dict[str, Any], n: int) -> Image.Image:
    if set(item) != {"image"} or not isinstance(item["image"], str):
        raise HTTPProblem(400, "invalid_input", f"input[{n}] has {sorted(item)}; an image is "
                          '{"image": "<base64 PNG or JPEG>"}')
    try:
        image = Image.open(io.BytesIO(base64.b64decode(item["image"], validate=True)))
    except (binascii.Error, UnidentifiedImageError, ValueError):
        raise HTTPProblem(400, "invalid_input", f"input[{n}] is not a base64 PNG or JPEG image") from None
    if max(image.size) > MAX_IMAGE_SIDE:
        raise HTTPProblem(413, "too_large", f"input[{n}] is {image.size[0]} x {image.size[1]} px; images of at most "
                          f"{MAX_IMAGE_SIDE} px a side are decoded: scale it down first")
    try:
        image.load()
    except OSError as err:
        raise HTTPProblem(400, "invalid_input", f"input[{n}] could not be decoded ({err})") from None
    return image
