"""What the diffusion benchmark measures: its cells, the batch, and one training step of a method on a cell.

- :class:`DiffusionCell`: one method's step on one diffusion backbone, batch, image size, device and owner
  recomputation setting.
- :func:`diffusion_batch`: ``B`` prompts of random token ids in the text encoder's 77 positions (CLIP's layout:
  start token, real tokens, end token, padding with the end token; real lengths spread from 8 to 60), noisy latents
  ``[B, C, h, w]`` at ``size / f`` (f the VAE's factor), one timestep per row and a noise target, from fixed seeds.
  Memory and time do not depend on which values they are, so neither the VAE nor a tokenizer is needed.
- :func:`build_step`: the training step of a registered method through ``AdaptedModel``: the UNet's prediction
  (``model.predict_noise``), the mean squared error to the noise target, backward, one AdamW step at the method's
  registry rate. ``dga`` and ``lga`` train adapters on the prompt through the boundary (their gradients come back
  as VJPs at ``text.token_embeds`` and ``text.layer.k``); ``lora`` (PEFT on the UNet's attention ``to_q``, ``to_k``,
  ``to_v``, ``to_out.0``) and ``full`` (every UNet weight) train the client's white-box copy. Recomputation is the
  owner's ``open_backbone(..., recompute=True)``: on a white-box copy it is the same switch, so the UNet's and the
  text encoder's blocks are checkpointed for every method alike (diffusers' gradient-checkpointing hook).

Example:
    >>> step, info = build_step(DiffusionCell("arch:sd-tiny", "dga", False, batch=1, size=32, device="cpu"))
    >>> step()
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graytune.access import Handle, open_backbone
from graytune.errors import InvalidInputError
from graytune.methods import MethodKind, get_method
from graytune.model import AdaptedModel
from graytune.types import AccessLevel

Tensor = torch.Tensor
Step = Callable[[], None]

METHODS = ("dga", "lga", "lora", "full")
"""The methods measured by default; ``full`` always runs (the ratios' reference)."""
NOISE = "noise"
"""The batch key of the step's target (the noise the scheduler would have added)."""
UNUSED = ("logit_scale",)
"""``AdaptedModel``'s CLIP temperature: a diffusion model never uses it, so it is not counted as trained."""


@dataclass(frozen=True)
class DiffusionCell:
    """One measurement: ``method``'s step on ``backbone`` at ``batch`` images of ``size`` x ``size`` pixels (``None``:
    the backbone's own size), with owner recomputation off or on; ``steps`` timed after ``warmup`` more."""

    backbone: str
    method: str
    recompute: bool
    batch: int
    size: int | None
    device: str
    steps: int = 1
    warmup: int = 0


def diffusion_batch(handle: Handle, batch: int, size: int | None, seed: int = 0) -> dict[str, Tensor]:
    """``text.input_ids``, ``text.attention_mask`` ``[B, L]``, ``latents.noisy`` and ``noise`` ``[B, C, h, w]`` and
    ``timestep`` ``[B]`` on the handle's device (see the module docstring); ``size`` in pixels, a multiple of the
    VAE's factor (``None``: the backbone's image size)."""
    pre = handle.spec.preprocess
    vocab, length = int(pre["text"]["vocab_size"]), int(pre["text"]["max_tokens"])
    factor, channels = int(pre["image"]["vae_scale_factor"]), int(pre["latents"]["channels"])
    size = int(pre["image"]["image_size"] or 64 * factor) if size is None else size
    if size < factor or size % factor:
        raise InvalidInputError(f"diffusion bench size {size}: {handle.spec.id}'s VAE downsamples by {factor}, so give "
                                f"a multiple of {factor} pixels (its own size is {pre['image']['image_size']})")
    g = torch.Generator().manual_seed(seed)
    start, end = vocab - 2, vocab - 1  # CLIP's start and end tokens are its last two ids
    lengths = torch.linspace(8, 60, batch).round().long() if batch > 1 else torch.tensor([34])
    ids = torch.full((batch, length), end, dtype=torch.long)  # [B, L], padded with the end token as SD's pipeline
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, n in enumerate(lengths.clamp(max=length).tolist()):
        ids[row, 0] = start
        ids[row, 1:n - 1] = torch.randint(0, start, (n - 2,), generator=g)
        mask[row, :n] = 1
    side = size // factor
    out = {"text.input_ids": ids, "text.attention_mask": mask,
           "latents.noisy": torch.randn(batch, channels, side, side, generator=g),  # [B, C, h, w]
           NOISE: torch.randn(batch, channels, side, side, generator=g),
           "timestep": torch.randint(0, int(pre["latents"]["num_train_timesteps"]), (batch,), generator=g)}
    return {k: v.to(handle.device) for k, v in out.items()}


def build_step(cell: DiffusionCell) -> tuple[Step, dict[str, Any]]:
    """The step ``cell`` measures (a closure over its model, batch and optimizer) and what it trains: ``trainable``,
    the ``latents`` shape, and for white-box steps the pipeline's ``params`` and ``weights_mb`` (one copy of its
    state) and the UNet's ``unet_params`` and ``unet_mb``."""
    method = get_method(cell.method)
    white = method.kind is MethodKind.WHITEBOX
    handle = open_backbone(cell.backbone, AccessLevel.WHITE_BOX if white else method.min_access, reads=method.reads,
                           device=cell.device, recompute=cell.recompute)
    model = AdaptedModel.build(handle, cell.method)
    batch = diffusion_batch(handle, cell.batch, cell.size)
    del handle  # white-box methods run on the model's own copy; the owner's (arch: backbones are not cached) can go
    gc.collect()
    params = [p for n, p in model.named_parameters() if p.requires_grad and n not in UNUSED]
    info: dict[str, Any] = {"trainable": sum(p.numel() for p in params),
                            "latents": list(batch["latents.noisy"].shape)}
    if model.backbone_module is not None:
        info.update(_weights(model.backbone_module))
    optimizer = torch.optim.AdamW(params, lr=method.lr or 1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        prediction = model.predict_noise(batch)  # [B, C, h, w]
        F.mse_loss(prediction.float(), batch[NOISE].float()).backward()
        optimizer.step()

    return step, info


def _weights(module: nn.Module) -> dict[str, Any]:
    """The pipeline's parameters and MB of one copy of its state, and the UNet's (what full fine-tuning trains)."""
    def size(part: nn.Module) -> float:
        tensors = {t.data_ptr(): t for t in [*part.parameters(), *part.buffers()]}  # tied tensors counted once
        return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20

    unet = module.get_submodule("unet")
    return {"params": sum(p.numel() for p in module.parameters()), "weights_mb": size(module),
            "unet_params": sum(p.numel() for p in unet.parameters()), "unet_mb": size(unet)}
