"""The owner's sampling loop for a Stable Diffusion backbone (``diffusion.HFDiffusion``): images from prompts.

It runs what diffusers' ``StableDiffusionPipeline.__call__`` runs, step for step, with the pipeline's own parts:
the prompts' last hidden states (a client's ``add``/``insert`` edits applied to the conditional prompts' encoding,
the negative prompt plain), latents drawn with ``diffusers.utils.torch_utils.randn_tensor`` from one CPU generator
seeded per request, scaled by the scheduler's ``init_noise_sigma``, then for each timestep the UNet on the
(scaled) latents, classifier-free guidance ``uncond + g * (cond - uncond)`` when ``g > 1`` (as the pipeline's
``do_classifier_free_guidance``) and the scheduler's step (``eta`` 0, the generator where the step takes them),
and at the end the VAE decode, mapped from [-1, 1] to [0, 1] as ``VaeImageProcessor.postprocess`` does.

Each request steps a scheduler of its own, made from the pipeline's scheduler config: concurrent requests never
share scheduler state. Nothing here checks a request's size: the boundary bounds it before calling (``sample``).

Example:
    >>> images = sample(backbone, prompt_inputs, {}, {}, negative_inputs, steps=25, guidance=7.5, seed=0,
    ...                 height=64, width=64)          # [B, 3, 64, 64] in [0, 1]
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from graytune.backbones.tokens import PortEdits

Tensor = torch.Tensor


def fresh_scheduler(scheduler: Any) -> Any:
    """A scheduler of ``scheduler``'s class and config with no state of its own yet (one per request)."""
    return type(scheduler).from_config(scheduler.config)


def sample(backbone: Any, inputs: Mapping[str, Tensor], add: Mapping[str, Tensor], insert: Mapping[str, Tensor],
           negative: Mapping[str, Tensor], *, steps: int, guidance: float, seed: int, height: int,
           width: int) -> Tensor:
    """``[B, 3, height, width]`` float32 images in [0, 1], one per prompt row of ``inputs``.

    Args:
        backbone: an ``HFDiffusion`` (its text encoder, UNet, VAE and scheduler).
        inputs: ``text.input_ids`` and ``text.attention_mask`` ``[B, L]`` of the prompts.
        add, insert: the client's edits, as a forward takes them, applied to the prompts' encoding.
        negative: ``text.input_ids`` and ``text.attention_mask`` ``[B, L]`` of the negative prompts (plain);
            run only when ``guidance > 1``.
        steps: the scheduler's inference steps.
        guidance: the classifier-free guidance scale (at most 1: the prompts alone).
        seed: the seed of the CPU generator the initial latents (and any noise a step adds) are drawn from.
        height, width: the images' size, multiples of the VAE's factor.
    """
    from diffusers.utils.torch_utils import randn_tensor

    with torch.no_grad():
        cond = backbone.encode_prompts(inputs, PortEdits(add, insert, (), {}))  # [B, L', D]
        uncond = backbone.encode_prompts(negative, PortEdits({}, {}, (), {})) if guidance > 1 else None
        scheduler = fresh_scheduler(backbone.scheduler)
        scheduler.set_timesteps(steps, device=cond.device)
        generator = torch.Generator().manual_seed(seed)
        f, channels = backbone.vae_factor, int(backbone.model.unet.config.in_channels)
        shape = (int(cond.shape[0]), channels, height // f, width // f)
        latents = randn_tensor(shape, generator=generator, device=cond.device, dtype=cond.dtype)
        latents = latents * scheduler.init_noise_sigma  # [B, C, h, w]
        extra = step_arguments(scheduler, generator)
        for t in scheduler.timesteps:
            noise = guided_prediction(backbone, scheduler, latents, t, cond, uncond, guidance)
            latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
        return decode(backbone, latents)


def step_arguments(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    """``eta`` 0 and the generator, for a scheduler whose ``step`` takes them (the pipeline's
    ``prepare_extra_step_kwargs`` with its default ``eta``)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    return {key: value for key, value in (("eta", 0.0), ("generator", generator)) if key in accepted}


def guided_prediction(backbone: Any, scheduler: Any, latents: Tensor, t: Tensor, cond: Tensor,
                      uncond: Tensor | None, guidance: float) -> Tensor:
    """``[B, C, h, w]``: the UNet's prediction at timestep ``t``, guided by the negative prompts when ``uncond`` is
    given. Prompts of one length run in one UNet call (as the pipeline's); edits that lengthened the conditional
    prompts (tokens inserted inside the text encoder) make it two."""
    if uncond is None:
        return backbone.predict(scheduler.scale_model_input(latents, t), t, cond)
    if uncond.shape == cond.shape:
        doubled = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        plain, prompted = backbone.predict(doubled, t, torch.cat([uncond, cond])).chunk(2)
    else:
        scaled = scheduler.scale_model_input(latents, t)
        plain, prompted = backbone.predict(scaled, t, uncond), backbone.predict(scaled, t, cond)
    return plain + guidance * (prompted - plain)


def decode(backbone: Any, latents: Tensor) -> Tensor:
    """``[B, 3, H, W]`` float32 in [0, 1]: the VAE's decode of ``latents`` ``[B, C, h, w]``."""
    vae = backbone.model.vae
    image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]  # [B, 3, H, W] in [-1, 1]
    return (image * 0.5 + 0.5).clamp(0, 1).float()
