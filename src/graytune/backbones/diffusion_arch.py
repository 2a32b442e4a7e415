"""``arch:sd15-random``: a pipeline of Stable Diffusion 1.5's shape with random weights, built in code.

Memory and time do not depend on the weights' values, so this gives SD-1.5-scale figures on machines that cannot
hold (or download) the real checkpoint: benchmarks only, never quality. Nothing is downloaded. The parts are those
of ``runwayml/stable-diffusion-v1-5``'s configs:

- ``UNet2DConditionModel``: diffusers' defaults (SD 1.x's UNet: ``block_out_channels`` (320, 640, 1280, 1280), two
  layers per block, 8 attention heads) with ``cross_attention_dim`` 768 and ``sample_size`` 64; 859.5 M parameters;
- ``CLIPTextModel`` of CLIP ViT-L/14's text tower: 12 layers, width 768, 12 heads, MLP 3072, quick-GELU,
  77 positions, vocabulary 49408, and SD 1.5's legacy special ids (bos 0, eos 2, pad 1: its end token is found as
  the highest id, ``diffusion.end_positions``); 123.1 M parameters;
- ``AutoencoderKL`` with SD's config: ``block_out_channels`` [128, 256, 512, 512], two layers per block, 4 latent
  channels, 8x downsampling, ``scaling_factor`` 0.18215; 83.7 M parameters;
- ``PNDMScheduler`` with SD's betas (scaled linear, 0.00085 to 0.012, 1000 training timesteps, PRK steps skipped,
  steps offset 1), epsilon prediction.

Tokenizer: none. SD's 49408-token BPE vocabulary does not ship here, and a random-weight benchmark gains nothing
from text: send ``text.input_ids`` and ``text.attention_mask`` ``[B, 77]`` (``tokenize`` says so, as the
``arch:`` CLIP and Llama backbones do). Ids follow CLIP's layout: start 49406, end 49407 (the highest id, so
``end_positions`` finds it), padding with the end token.

Building the weights takes seconds per part on two CPU cores (about 4.3 GB in fp32), each part after its own
``manual_seed(0)``, so the same id gives the same weights and fingerprint. ``build_sd15_parts("meta")`` builds the
same modules with no storage at all: the spec (ports, shapes, scheduler) without the weights, for tests.
"""

from __future__ import annotations

from typing import Any

import torch

from graytune.backbones.diffusion import DiffusionModules, HFDiffusion, describe
from graytune.backbones.hf_diffusion import quiet_diffusers, require_diffusers
from graytune.backbones.loading import quiet_loading
from graytune.backbones.registry import BACKBONES

SEED = 0
ID = "arch:sd15-random"
#: SD 1.5's text encoder (openai/clip-vit-large-patch14's text tower, as SD 1.5's text_encoder/config.json states it)
TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
        "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
#: SD 1.5's UNet: diffusers' UNet2DConditionModel defaults are SD 1.x's, but for these two
UNET = {"cross_attention_dim": 768, "sample_size": 64}
#: SD 1.5's VAE (vae/config.json)
VAE = {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
       "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "latent_channels": 4,
       "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215, "in_channels": 3, "out_channels": 3}
#: SD 1.5's scheduler (scheduler/scheduler_config.json)
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False, "prediction_type": "epsilon"}


def build_sd15_parts(device: str | torch.device = "cpu") -> dict[str, Any]:
    """The text encoder, UNet and VAE of SD 1.5's shape on ``device`` and its scheduler (seeded; the caller's random
    state is left as it was). ``"meta"`` builds the modules without storage (shapes and configs only)."""
    require_diffusers()
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]), quiet_loading(), quiet_diffusers(), torch.device(device):
        torch.manual_seed(SEED)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT))
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(**UNET)
        torch.manual_seed(SEED)
        vae = AutoencoderKL(**VAE)
    return {"text_encoder": text_encoder.eval(), "unet": unet.eval(), "vae": vae.eval(),
            "scheduler": PNDMScheduler(**SCHEDULER)}


def sd15_random(device: str | torch.device = "cpu") -> HFDiffusion:
    """SD 1.5's shape behind the ports, built on ``device`` (``"meta"``: the spec without weights)."""
    parts = build_sd15_parts(device)
    modules = DiffusionModules(parts["text_encoder"], parts["unet"], parts["vae"])
    about = describe(modules, parts["scheduler"], "Stable Diffusion 1.5's architecture with random weights (seed 0; "
                                                  "benchmarks of memory and time only, never quality; no tokenizer: "
                                                  "send text.input_ids)")
    return HFDiffusion(modules, None, parts["scheduler"], ID, f"random:sd15:seed{SEED}", about)


@BACKBONES.register(ID)
def build_sd15_random() -> HFDiffusion:
    """Stable Diffusion 1.5's shape with random weights (benchmarks; about 4.3 GB in fp32)."""
    return sd15_random()
