"""``arch:sd-tiny``: a tiny random Stable Diffusion pipeline built in code, as diffusers' own tests build one.

A ``UNet2DConditionModel`` with ``block_out_channels=(4, 8)`` cross-attending at width 8, an ``AutoencoderKL`` with
``block_out_channels=[4, 8]`` and 4 latent channels (so latents are H/2 x W/2), a 2-layer ``CLIPTextModel`` of width 8,
a DDIM scheduler (SD's betas and steps offset, epsilon prediction, 1000 training timesteps) and a character-level
CLIP tokenizer written here (77 tokens, padded with its end token as SD 1.x's). The weights are drawn from seed 0,
each part after its own ``manual_seed(0)`` as diffusers' tests do, so the same id gives the same weights and
fingerprint.

Everything measured on it measures mechanics (shapes, gradients, time), never quality. A call takes milliseconds.
``build_tiny_parts`` gives the parts themselves (tests save them with ``StableDiffusionPipeline.save_pretrained`` to
exercise ``hf-diffusion:``).
"""

from __future__ import annotations

import string
from typing import Any

import torch

from graytune.backbones.diffusion import DiffusionModules, HFDiffusion, describe
from graytune.backbones.hf_diffusion import quiet_diffusers, require_diffusers
from graytune.backbones.loading import quiet_loading
from graytune.backbones.registry import BACKBONES

WIDTH, TEXT_LAYERS, MAX_TOKENS, SEED = 8, 2, 77, 0
START, END = "<|startoftext|>", "<|endoftext|>"
#: a few merges, so common words take fewer tokens than letters (each result is in the vocabulary)
MERGES = [("o", "f</w>"), ("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"),
          ("do", "g</w>")]


def tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary: each character alone and word-final (``</w>``), the ``MERGES`` results, then the
    start and end tokens (the end token has the highest id, as in CLIP's)."""
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-*")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    for left, right in MERGES:
        vocab.setdefault(left + right, len(vocab))
    vocab[START], vocab[END] = len(vocab), len(vocab) + 1
    return vocab, list(MERGES)


def tiny_tokenizer() -> Any:
    """A ``CLIPTokenizer`` over ``tiny_vocab``: 77 tokens at most, padded with the end token (SD 1.x's layout)."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, unk_token=END, bos_token=START, eos_token=END, pad_token=END,
                         model_max_length=MAX_TOKENS)


def build_tiny_parts() -> dict[str, Any]:
    """The parts of the tiny pipeline, as ``StableDiffusionPipeline`` takes them: ``text_encoder``, ``tokenizer``,
    ``unet``, ``vae``, ``scheduler`` (seeded; the caller's random state is left as it was)."""
    require_diffusers()
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    vocab = len(tiny_vocab()[0])
    with torch.random.fork_rng(devices=[]), quiet_loading(), quiet_diffusers():
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(
            block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=WIDTH, norm_num_groups=2)
        torch.manual_seed(SEED)
        vae = AutoencoderKL(
            block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"])
        torch.manual_seed(SEED)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=2, max_position_embeddings=MAX_TOKENS, layer_norm_eps=1e-5,
            bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # steps_offset as SD's own configs set it
    return {"text_encoder": text_encoder.eval(), "tokenizer": tokenizer, "unet": unet.eval(), "vae": vae.eval(),
            "scheduler": scheduler}


@BACKBONES.register("arch:sd-tiny")
def build_sd_tiny() -> HFDiffusion:
    """The tiny random Stable Diffusion pipeline behind the ports (tests, demos; mechanics only)."""
    parts = build_tiny_parts()
    modules = DiffusionModules(parts["text_encoder"], parts["unet"], parts["vae"])
    about = describe(modules, parts["scheduler"], "tiny random Stable Diffusion pipeline built as diffusers' tests "
                                                  "build one (seed 0; mechanics only, never quality)")
    return HFDiffusion(modules, parts["tokenizer"], parts["scheduler"], "arch:sd-tiny", f"random:sd-tiny:seed{SEED}",
                       about)
