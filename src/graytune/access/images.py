"""Image generation through the boundary: the owner samples a text-to-image diffusion model, the client gets images.

A client sends its prompts (text or ids) with the same ``add``/``insert`` edits a forward takes (a DGA shift and
extra token, a soft prompt, LGA's tokens at ``text.layer.k``); the owner applies them to the conditional prompts'
encoding, encodes the negative prompt (``ImageSettings.negative_prompt``, default ``""``) plain, and runs the whole
sampling loop with the pipeline's own parts (``graytune.backbones.diffusion_sampling``: classifier-free guidance, a
scheduler of the request's own, the VAE decode).

**What sampling reveals**: the decoded images ``[B, 3, H, W]`` float32 in [0, 1], and nothing else: no latents, no
UNet prediction, no text-encoder states, no gradient. So it is allowed from black-box, as a language model's
generation is. Each request is one forward query of its rows in the exposure record (``forward_queries``,
``forward_samples``); its images are counted in ``generated_images`` and the steps that shaped them in
``denoising_steps`` (rows x steps; guidance doubles the owner's compute, not what comes back). Edits sent at
black-box are recorded as a forward's are (``black_box_edits``): images under +-eps edits at ``text.token_embeds``
are finite differences of the whole sampler, as outputs are of a forward.

Bounds, checked before any work (``InvalidInputError``): steps from 1 to ``MAX_STEPS`` and at most the scheduler's
``num_train_timesteps``; guidance finite, from 0 to ``MAX_GUIDANCE``; at most ``MAX_ROWS`` prompts; height and width
positive multiples of the VAE's factor, each at most twice the model's own size (``spec.preprocess["image"]``).
A server bounds its work further (``graytune serve --max-pixels``, ``--max-denoising-work``).

Over the network (``POST /v1/generate-images``, ``RemoteHandle.generate_images``) a request is a forward's message
(``graytune.access.wire``: ``inputs/``, ``add/``, ``insert/``) with the settings as metadata (``settings``):
``pack_image_request``, ``unpack_image_request``. The answer is a message of one tensor, ``images``
``[B, 3, H, W]`` float32 (``pack_images``, ``unpack_images``).

Example:
    >>> handle = graytune.open_backbone("arch:sd-tiny", access="black-box")
    >>> images = handle.generate_images({"text": ["a red circle"]}, settings={"num_inference_steps": 10, "seed": 1})
    >>> images.shape
    torch.Size([1, 3, 64, 64])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from graytune.access.checks import CallPlan, client_device
from graytune.access.generation import settings_as
from graytune.access.wire import CallRequest, Message, call_parts, decode, encode, unpack_call
from graytune.errors import InvalidInputError
from graytune.types import BackboneSpec, Exposure

Tensor = torch.Tensor

#: The most denoising steps one request may ask (and never more than the scheduler's training timesteps).
MAX_STEPS = 1000
#: The largest classifier-free guidance scale a request may ask.
MAX_GUIDANCE = 100.0
#: The most prompts (images) one request may ask.
MAX_ROWS = 64
#: The longest negative prompt, in characters (the tokenizer keeps its first tokens anyway).
MAX_NEGATIVE_CHARS = 4096
#: The route a served backbone samples at.
ROUTE = "/v1/generate-images"
#: The one tensor of an answer: ``[B, 3, H, W]`` float32 in [0, 1].
IMAGES = "images"


@dataclass(frozen=True)
class ImageSettings:
    """How the owner samples a diffusion model (the names and defaults of diffusers' ``StableDiffusionPipeline``).

    Attributes:
        num_inference_steps: the scheduler's steps (1..``MAX_STEPS``, at most its ``num_train_timesteps``).
        guidance_scale: classifier-free guidance; at most 1 runs the prompts alone (no negative prompt).
        seed: the seed of the generator the initial latents are drawn from (the same request, the same images).
        height: the images' height in pixels (None: the model's own size); a multiple of the VAE's factor.
        width: the images' width in pixels (None: the model's own size); a multiple of the VAE's factor.
        negative_prompt: the unconditional prompt guidance pushes away from (encoded plain, never edited).
    """

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    height: int | None = None
    width: int | None = None
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        problems = []
        steps, guidance = self.num_inference_steps, self.guidance_scale
        if not _whole(steps) or not 1 <= steps <= MAX_STEPS:
            problems.append(f"num_inference_steps must be a whole number from 1 to {MAX_STEPS}; got {steps!r}")
        if not _number(guidance) or not math.isfinite(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
            problems.append(f"guidance_scale must be a finite number from 0 to {MAX_GUIDANCE:g} (7.5 is diffusers' "
                            f"default; at most 1 turns guidance off); got {guidance!r}")
        if not _whole(self.seed) or not 0 <= self.seed < 2**63:
            problems.append(f"seed must be a whole number from 0 to 2**63 - 1; got {self.seed!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not _whole(value) or value < 1):
                problems.append(f"{name} must be a positive whole number of pixels (or left out); got {value!r}")
        negative = self.negative_prompt
        if not isinstance(negative, str) or len(negative) > MAX_NEGATIVE_CHARS:
            got = f"{len(negative)} characters" if isinstance(negative, str) else type(negative).__name__
            problems.append(f"negative_prompt must be a string of at most {MAX_NEGATIVE_CHARS} characters; got {got}")
        if problems:
            raise InvalidInputError("image settings refused: " + "; ".join(problems))


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def image_settings_of(settings: ImageSettings | Mapping[str, object] | None) -> ImageSettings:
    """``settings`` as ``ImageSettings`` (a mapping's keys checked; None: the defaults)."""
    return settings_as(ImageSettings, settings, "image", '{"num_inference_steps": 25}')  # type: ignore[no-any-return]


def is_image_generator(spec: BackboneSpec) -> bool:
    """Whether ``spec`` is a text-to-image diffusion model's (it publishes ``unet.prediction``)."""
    return "unet.prediction" in spec.port_names()


def model_size(spec: BackboneSpec) -> tuple[int, int, int]:
    """``(height, width, factor)``: the images a diffusion model makes by default, and its VAE's factor."""
    image, latents = spec.preprocess.get("image", {}), spec.preprocess.get("latents", {})
    factor = int(image.get("vae_scale_factor", 1))
    sample = latents.get("sample_size")
    height, width = (sample, sample) if isinstance(sample, int) else tuple(sample or (64, 64))[:2]
    return int(height) * factor, int(width) * factor, factor


def check_image_plan(spec: BackboneSpec, plan: CallPlan, settings: ImageSettings) -> ImageSettings:
    """``settings`` with the size filled in, once the request is known to fit (see the module's bounds).

    Raises:
        InvalidInputError: not a diffusion model, no prompt, too many rows, too many steps, a bad size.
    """
    if not is_image_generator(spec):
        raise InvalidInputError(f"{spec.id} is not a text-to-image diffusion model, so it cannot generate images; "
                                "give a diffusion backbone (arch:sd-tiny, hf-diffusion:DIR), or generate text with "
                                "a language model's generate")
    if "text.input_ids" not in plan.inputs:
        raise InvalidInputError("image generation needs prompts: send {'text': [...]} or text.input_ids")
    if plan.batch > MAX_ROWS:
        raise InvalidInputError(f"{plan.batch} prompts in one image request; at most {MAX_ROWS} are sampled at once: "
                                "split them over several requests")
    trained = int(spec.preprocess.get("latents", {}).get("num_train_timesteps", MAX_STEPS))
    if settings.num_inference_steps > trained:
        raise InvalidInputError(f"num_inference_steps={settings.num_inference_steps}: this model's scheduler was "
                                f"trained on {trained} timesteps, so it samples in at most {trained} steps; ask fewer")
    height, width, factor = model_size(spec)
    sized = replace(settings, height=settings.height or height, width=settings.width or width)
    for name, value, default in (("height", sized.height, height), ("width", sized.width, width)):
        if value % factor or value > 2 * default:
            raise InvalidInputError(
                f"{name}={value} pixels: this model's VAE works in blocks of {factor} pixels and makes {default} by "
                f"default, so {name} must be a multiple of {factor} up to {2 * default}; ask e.g. "
                f"{min(2 * default, max(factor, value - value % factor))}")
    return sized


def negative_inputs(tokens: Mapping[str, Tensor], rows: int) -> dict[str, Tensor]:
    """The negative prompt's ``[1, L]`` ids and mask, one copy per row ``[rows, L]``."""
    return {name: value.repeat(rows, 1) for name, value in tokens.items()}


def sampling_arguments(settings: ImageSettings) -> dict[str, Any]:
    """The keyword arguments of the owner's sampler (``diffusion_sampling.sample``) for checked, sized settings."""
    return {"steps": settings.num_inference_steps, "guidance": float(settings.guidance_scale),
            "seed": settings.seed, "height": settings.height, "width": settings.width}


def count_images(exposure: Exposure, rows: int, steps: int) -> None:
    exposure.generated_images += rows
    exposure.denoising_steps += rows * steps


# ---- the Python entry and the remote client ------------------------------------------------------------

def generate_images(model_or_handle: Any, prompts: Sequence[str] | Mapping[str, Tensor],
                    settings: ImageSettings | Mapping[str, object] | None = None) -> Tensor:
    """``[B, 3, H, W]`` float32 images in [0, 1], one per prompt, sampled by the owner.

    Args:
        model_or_handle: an ``AdaptedModel`` on a diffusion backbone (its text adapters' edits go with the
            prompts: ``prepare_tower("text", ...)``), or a handle (the prompts plain).
        prompts: texts, or their ``text.input_ids`` and ``text.attention_mask``.
        settings: ``ImageSettings`` or its fields as a mapping.

    Example:
        >>> images = generate_images(model, ["a red circle", "a blue square"], {"num_inference_steps": 25})
    """
    tokens_given = isinstance(prompts, Mapping)
    if not hasattr(model_or_handle, "prepare_tower"):
        inputs = dict(prompts) if tokens_given else {"text": list(prompts)}
        return model_or_handle.generate_images(inputs, settings=settings)  # type: ignore[no-any-return]
    model = model_or_handle
    tokens = dict(prompts) if tokens_given else model.tokenize(list(prompts))
    with torch.no_grad():
        request = model.prepare_tower("text", tokens)
        if request.gate is not None:
            raise InvalidInputError("this model's text adapters gate their tokens (two calls mixed by a gate), "
                                    "which image generation does not run; sample with an adapter without a gate")
        return model.handle.generate_images(request.inputs, add=request.add, insert=request.insert,  # type: ignore
                                            settings=settings)


def remote_generate_images(handle: Any, inputs: Mapping[str, Tensor | Sequence[str]], *,
                           add: Mapping[str, Tensor] | None = None, insert: Mapping[str, Tensor] | None = None,
                           settings: ImageSettings | Mapping[str, object] | None = None) -> Tensor:
    """As ``LocalHandle.generate_images``; the owner samples on the server (``POST /v1/generate-images``)."""
    chosen = image_settings_of(settings)
    with torch.no_grad():
        plan = handle._plan(inputs, add, insert, [], [], 0)
        sized = check_image_plan(handle.spec, plan, chosen)
    body = pack_image_request(plan, handle.access.label, sized)
    images = unpack_images(decode(handle._request("POST", ROUTE, content=body).content))
    count_images(handle.exposure, plan.batch, sized.num_inference_steps)
    return images.to(client_device(plan, handle.device))


# ---- over the network ---------------------------------------------------------------------------------

@dataclass
class ImageRequest:
    """An image request as the server reads it, before its checks against the spec."""

    call: CallRequest  # the prompts and edits, as a forward's (``outputs`` empty)
    settings: ImageSettings


def pack_image_request(plan: CallPlan, access: str, settings: ImageSettings) -> bytes:
    """An image request for a checked ``plan`` (``pack_call``'s parts) and its settings."""
    tensors, meta = call_parts(plan, access)
    return encode(tensors, {**meta, "settings": asdict(settings)})


def unpack_image_request(message: Message) -> ImageRequest:
    """The image request in ``message``; an ``InvalidInputError`` (400) naming what is wrong."""
    tensors, meta = message
    if meta.get("grad"):
        raise InvalidInputError("image generation returns images and no gradient; send 'grad': [] (or leave it out)")
    settings = meta.get("settings", {})
    call = unpack_call((tensors, {**meta, "outputs": [], "reads": []}))
    return ImageRequest(call, image_settings_of(settings))


def pack_images(images: Tensor) -> bytes:
    """An image request's answer: ``images`` ``[B, 3, H, W]`` float32."""
    return encode({IMAGES: images.detach().float().cpu().contiguous()})


def unpack_images(message: Message) -> Tensor:
    """The images in an answer of ``pack_images``."""
    tensors, _ = message
    images = tensors.get(IMAGES)
    if images is None or images.dim() != 4:
        raise InvalidInputError(f"the server's answer lacks images [B, 3, H, W] (it holds {sorted(tensors)}); "
                                "client and server may speak different protocol versions")
    return images
