"""The owner's side of ``POST /v1/generate-images``: a diffusion model samples images for a client, checked, charged.

An image request is checked as a forward is, before any work (level, the black-box edits policy, the texts' size
and token positions), then as ``graytune.access.images`` bounds every sampling (steps, rows, finite guidance, a size
in the VAE's blocks), then against this server's limits: its images' pixels, rows x height x width, at most
``--max-pixels``, and its denoising work, rows x steps x latent positions (twice that with guidance: the negative
prompts' UNet calls), at most ``--max-denoising-work``. It is charged before it runs, one sample per row and its
prompts' real tokens (``--quota-tokens``), and refunded whole when it is not served. The owner samples through
``LocalHandle.generate_images`` under the compute lock and the request's deadline (a sampling past it stops at its
next torch operation and answers 504).

Example:
    >>> job = plan_images(service, "alice", read_request(body))        # on a checks thread
    >>> charge = charge_images(service, "alice", job)
    >>> images = await run_images(service, "alice", job, charge, service.deadline())
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from graytune.access import CallPlan, LocalHandle
from graytune.access.images import ImageSettings, check_image_plan, model_size, unpack_image_request
from graytune.access.wire import Message
from graytune.serve.admission import check_texts, check_work, tokens_of, too_large
from graytune.serve.config import ServeConfig
from graytune.serve.edits import note_edits, refuse_edits
from graytune.serve.ledger import Charge
from graytune.serve.service import Service

__all__ = ["ImageJob", "charge_images", "denoising_work", "plan_images", "run_images"]
Tensor = torch.Tensor


@dataclass
class ImageJob:
    """One checked image request: the handle at its level, its checked prompts and edits, its sized settings."""

    handle: LocalHandle
    plan: CallPlan
    settings: ImageSettings

    @property
    def rows(self) -> int:
        return self.plan.batch


def denoising_work(rows: int, settings: ImageSettings, factor: int) -> int:
    """UNet latent positions a sampling runs: rows x steps x (H/f x W/f), twice that with guidance (> 1)."""
    latents = (int(settings.height or 0) // factor) * (int(settings.width or 0) // factor)  # sized: never 0
    return rows * settings.num_inference_steps * latents * (2 if settings.guidance_scale > 1 else 1)


def plan_images(service: Service, client: str, message: Message) -> ImageJob:
    """The checked image request ``message`` asks for (nothing charged, nothing run): 400 for bad settings or
    input, 403 above the level (or black-box edits the owner refuses), 413 past a limit."""
    asked = unpack_image_request(message)
    handle, config = service.level_handle(asked.call.access), service.config
    inputs: dict[str, Any] = dict(asked.call.inputs)
    check_texts([asked.settings.negative_prompt], config, "negative prompts")
    if asked.call.texts is not None:
        check_texts(asked.call.texts, config)
        inputs["text"] = asked.call.texts
    check_work(inputs, asked.call.insert, config, grad=False)  # ids, before texts are tokenized
    with torch.no_grad():
        plan = handle.check(inputs, asked.call.add, asked.call.insert, [], [])
        sized = check_image_plan(handle.spec, plan, asked.settings)
    check_work(plan.inputs, plan.insert, config, grad=False)
    check_sampling(plan.batch, sized, model_size(handle.spec)[2], config)
    refuse_edits(service.edits_policy, handle, plan)
    return ImageJob(handle, plan, sized)


def check_sampling(rows: int, settings: ImageSettings, factor: int, config: ServeConfig) -> None:
    """413 past ``--max-pixels`` (the images' pixels) or ``--max-denoising-work`` (``denoising_work``)."""
    height, width = int(settings.height or 0), int(settings.width or 0)  # sized by check_image_plan
    pixels = rows * height * width
    if pixels > config.max_pixels:
        raise too_large(f"this request asks {pixels:,} pixels ({rows:,} images of {height} x {width})",
                        config.max_pixels, "--max-pixels", "ask fewer or smaller images")
    work = denoising_work(rows, settings, factor)
    if work > config.max_denoising_work:
        guided = " x 2 for guidance" if settings.guidance_scale > 1 else ""
        raise too_large(f"this request asks {work:,} UNet latent positions ({rows:,} images x "
                        f"{settings.num_inference_steps:,} steps x {height // factor} x {width // factor} "
                        f"latents{guided})", config.max_denoising_work,
                        "--max-denoising-work", "ask fewer images, fewer steps or smaller images per request")


def charge_images(service: Service, client: str, job: ImageJob) -> Charge:
    """Charge a checked image request before it runs: its rows and its prompts' tokens; 429 past a quota. A
    black-box edit is then recorded as ``--black-box-edits count`` says."""
    tokens = tokens_of(job.plan.inputs)
    service.ledger.charge(client, job.rows, tokens=tokens)
    note_edits(service.ledger, client, job.handle, job.plan, service.edits_policy)
    return Charge(samples=job.rows, tokens=tokens)


async def run_images(service: Service, client: str, job: ImageJob, charge: Charge, until: float) -> Tensor:
    """Sample ``job`` on the backbone by ``until``; work not served is refunded whole."""
    try:
        return await service.compute(lambda: _sample(job), until)
    except BaseException:
        await service.refund(client, charge=charge)
        raise


def _sample(job: ImageJob) -> Tensor:
    plan = job.plan
    return job.handle.generate_images(plan.inputs, add=plan.add, insert=plan.insert, settings=job.settings)
