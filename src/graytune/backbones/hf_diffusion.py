"""A user's diffusers Stable Diffusion folder (or hub id) behind the ports: ``hf-diffusion:<dir or hub id>``.

Supported: what ``StableDiffusionPipeline.save_pretrained`` writes for Stable Diffusion 1.x and 2.x
(``model_index.json`` ``_class_name`` ``StableDiffusionPipeline``, epsilon or v prediction): a ``CLIPTextModel`` text
encoder, a CLIP tokenizer, a ``UNet2DConditionModel`` that takes the VAE's latent channels with no extra
conditioning and cross-attends at the text encoder's width, an ``AutoencoderKL`` and any diffusers scheduler. Every
one of those is checked from the JSON configs before a weight is read; anything else is refused with a message
naming what is supported. The ports are ``diffusion.py``'s.

Nothing is downloaded on graytune's own initiative: a hub id loads from the local cache only, unless the user sets
``GRAYTUNE_ALLOW_DOWNLOADS=1`` (``loading.hub_options``). No diffusion weights ship in any package these machines
reach; the tests save a tiny random pipeline (``diffusion_tiny``) and load it here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from graytune.backbones.diffusion import DiffusionModules, HFDiffusion, describe
from graytune.backbones.loading import ALLOW_DOWNLOADS, checkpoint_location, file_identity, hub_json, hub_options, \
    quiet_loading
from graytune.backbones.registry import BACKBONES
from graytune.errors import InvalidInputError, MissingDependencyError

FAMILY = "hf-diffusion"
PIPELINES = ("StableDiffusionPipeline",)
#: per component of model_index.json, the classes hf-diffusion loads (empty: any diffusers scheduler)
COMPONENTS: dict[str, tuple[str, ...]] = {
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "scheduler": (),
}
#: pipelines users may bring, and why hf-diffusion does not run them
OTHERS = {
    "StableDiffusionXLPipeline": "SDXL has two text encoders and size conditioning, not supported yet",
    "StableDiffusion3Pipeline": "SD3 is an MMDiT transformer with three text encoders, not a UNet",
    "FluxPipeline": "Flux is a transformer with a T5 text encoder, not a UNet",
    "StableDiffusionInpaintPipeline": "its UNet takes 9 channels (latents, mask, masked image)",
    "StableDiffusionUpscalePipeline": "its UNet takes the low-resolution image and a noise level too",
    "LatentConsistencyModelPipeline": "its UNet takes a guidance embedding (time_cond_proj_dim)",
}
#: UNet config keys that add conditioning Stable Diffusion 1.x/2.x do not have
EXTRA_CONDITIONING = ("addition_embed_type", "class_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim")
SUPPORTED = ("Stable Diffusion 1.x and 2.x folders written by StableDiffusionPipeline.save_pretrained "
             "(model_index.json _class_name 'StableDiffusionPipeline': a CLIPTextModel text encoder, a CLIP tokenizer, "
             "a UNet2DConditionModel, an AutoencoderKL and a diffusers scheduler)")


def require_diffusers() -> Any:
    """The ``diffusers`` module, or an error saying how to install it."""
    try:
        import diffusers
    except ImportError as err:
        raise MissingDependencyError(f"{FAMILY} backbones need diffusers: pip install -c constraints.txt "
                                     "diffusers==0.42.1 (it needs no torchvision)") from err
    return diffusers


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Hide diffusers' progress bars while loading (library code logs, it does not print)."""
    from diffusers.utils import logging as dlogging

    was_enabled = dlogging.is_progress_bar_enabled()
    dlogging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            dlogging.enable_progress_bar()


def load_diffusion_folder(source: str) -> HFDiffusion:
    """The Stable Diffusion pipeline in the folder (or cached hub id) ``source``, behind the ports.

    Example:
        >>> backbone = load_diffusion_folder("/models/stable-diffusion-v1-5")

    Raises:
        MissingDependencyError: diffusers is missing, or nothing loadable is there (nothing is downloaded).
        InvalidInputError: a pipeline or component hf-diffusion does not run; the message names what it runs.
    """
    require_diffusers()
    local, where = checkpoint_location(FAMILY, source, "StableDiffusionPipeline.save_pretrained")
    scheduler_class = check_pipeline(source, hub_json(where, "model_index.json"))
    check_components(source, {part: _config(source, where, f"{part}/config.json") for part in
                              ("text_encoder", "unet", "vae")})
    modules, tokenizer, scheduler = _load_parts(source, where, scheduler_class)
    identity = weights_identity(local) or f"hub:{source}"
    return HFDiffusion(modules, tokenizer, scheduler, f"{FAMILY}:{source}", identity,
                       describe(modules, scheduler, f"Stable Diffusion pipeline from {source}"))


def check_pipeline(source: str, index: Any) -> Any:
    """``model_index.json`` must name a supported pipeline and components; returns the scheduler's class.

    Raises:
        MissingDependencyError: no ``model_index.json``.
        InvalidInputError: another pipeline, a component of another class, or a scheduler diffusers does not have.
    """
    if not isinstance(index, dict):
        raise MissingDependencyError(
            f"{FAMILY}: no model_index.json in {source!r}; give a folder written by "
            f"StableDiffusionPipeline.save_pretrained (text_encoder, tokenizer, unet, vae, scheduler), or a hub id "
            f"in the local cache (graytune never downloads on its own; {ALLOW_DOWNLOADS}=1 lets diffusers fetch it)")
    name = index.get("_class_name")
    if name not in PIPELINES:
        why = f" ({OTHERS[name]})" if name in OTHERS else ""
        raise InvalidInputError(f"{FAMILY}: {source!r} holds a {name!r} pipeline{why}; {FAMILY} runs {SUPPORTED}")
    for part, classes in COMPONENTS.items():
        entry = index.get(part)
        got = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        if not isinstance(got, str) or (classes and got not in classes):
            raise InvalidInputError(f"{FAMILY}: {source!r} has {part} = {entry!r} in model_index.json; {FAMILY} "
                                    f"takes {' or '.join(classes) or 'a diffusers scheduler'} there ({SUPPORTED})")
    return scheduler_class(source, index["scheduler"][1])


def scheduler_class(source: str, name: str) -> Any:
    """The diffusers scheduler class called ``name`` (a name, never an import path).

    Raises:
        InvalidInputError: diffusers has no scheduler of that name.
    """
    diffusers = require_diffusers()
    found = getattr(diffusers, name, None) if name.isidentifier() and name.endswith("Scheduler") else None
    if not (isinstance(found, type) and issubclass(found, diffusers.SchedulerMixin)):
        raise InvalidInputError(f"{FAMILY}: {source!r} names the scheduler {name!r}, which diffusers "
                                f"{diffusers.__version__} does not have; save the pipeline with one of diffusers' "
                                "schedulers (e.g. DDIMScheduler, PNDMScheduler)")
    return found


def check_components(source: str, configs: Mapping[str, Mapping[str, Any]]) -> None:
    """The text encoder, UNet and VAE configs must fit together as Stable Diffusion 1.x/2.x's do.

    Raises:
        InvalidInputError: every mismatch found, in one message.
    """
    text, unet, vae = configs["text_encoder"], configs["unet"], configs["vae"]
    problems = []
    if text.get("model_type") != "clip_text_model":
        problems.append(f"text_encoder is a {text.get('model_type')!r} model, not a CLIP text model")
    latent = vae.get("latent_channels")
    if unet.get("in_channels") != latent or unet.get("out_channels") != latent:
        problems.append(f"the UNet takes {unet.get('in_channels')} channels and returns {unet.get('out_channels')}, "
                        f"but the VAE's latents have {latent} (inpainting and depth UNets take extra channels)")
    extra = [f"{key}={unet[key]!r}" for key in EXTRA_CONDITIONING if unet.get(key) is not None]
    if extra:
        problems.append(f"the UNet takes conditioning SD 1.x/2.x do not have ({', '.join(extra)})")
    if unet.get("cross_attention_dim") != text.get("hidden_size"):
        problems.append(f"the UNet cross-attends at width {unet.get('cross_attention_dim')}, but the text encoder "
                        f"is {text.get('hidden_size')} wide")
    if problems:
        raise InvalidInputError(f"{FAMILY}: {source!r} is not a pipeline {FAMILY} runs: {'; '.join(problems)}; "
                                f"{FAMILY} runs {SUPPORTED}")


def _config(source: str, where: str, name: str) -> dict[str, Any]:
    config = hub_json(where, name)
    if not isinstance(config, dict):
        raise MissingDependencyError(f"{FAMILY}: {source!r} has no {name}; a StableDiffusionPipeline folder holds "
                                     "text_encoder/, tokenizer/, unet/, vae/ and scheduler/ (save_pretrained writes "
                                     "them)")
    return config


def _load_parts(source: str, where: str, scheduler_cls: Any) -> tuple[DiffusionModules, Any, Any]:
    """The text encoder, UNet and VAE (float32), the tokenizer and the scheduler, from ``where``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    hub = hub_options()
    try:
        with quiet_loading(), quiet_diffusers():
            text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", dtype=torch.float32, **hub)
            tokenizer = AutoTokenizer.from_pretrained(where, subfolder="tokenizer", **hub)
            unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", dtype=torch.float32, **hub)
            vae = AutoencoderKL.from_pretrained(where, subfolder="vae", dtype=torch.float32, **hub)
            scheduler = scheduler_cls.from_pretrained(where, subfolder="scheduler", **hub)
    except (OSError, ValueError) as err:
        raise MissingDependencyError(
            f"{FAMILY}: could not load the pipeline's parts from {source!r}: {str(err).strip().splitlines()[0]}; "
            f"graytune never downloads on its own: save the pipeline with save_pretrained and give that folder, or "
            f"set {ALLOW_DOWNLOADS}=1 to let diffusers fetch a hub id") from err
    return DiffusionModules(text_encoder, unet, vae), tokenizer, scheduler


def weights_identity(local: Path) -> str:
    """The identity of the weight files the text encoder, UNet and VAE load from (``""`` for a hub id): the
    safetensors files (else the ``.bin`` ones) without a variant suffix such as ``.fp16``, which diffusers skips."""
    if not local.is_dir():
        return ""
    identities = []
    for part in ("text_encoder", "unet", "vae"):
        files = [p for p in sorted((local / part).glob("*.safetensors")) if "." not in p.stem] or \
                [p for p in sorted((local / part).glob("*.bin")) if "." not in p.stem]
        identities += [f"{part}/{file_identity(p)}" for p in files]
    return "+".join(identities)


@BACKBONES.register(f"{FAMILY}:", family_help="Stable Diffusion dir or hub id")
def build_hf_diffusion(source: str) -> HFDiffusion:
    return load_diffusion_folder(source)
