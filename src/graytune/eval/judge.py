"""CLIP-T and CLIP-I: a diffusion model's generated images scored by a dual encoder the user names (the judge).

The held-out denoising loss (``graytune.train.denoising``) says how well a model predicts noise; a judge says how its
images look to another model. For each of the first ``max_images`` held-out items, in the split's order, the owner
samples one image from the item's prompt (``AdaptedModel.generate_images``, seed ``settings.seed + i`` for item ``i``,
so image ``i`` is the same whatever the count and however the calls are grouped), and the judge embeds:

- the generated images, as a PIL image each (8 bits per channel, as a saved PNG would hold them) through the judge's
  own preprocessing (``ImagePreprocess.from_spec``: its ``image_size``, mean and std);
- the prompts, as the text the diffusion model was given (``DenoisingTask.prompts``: the caption in the template).
  The adapter's learned token (DGA's extra token, a soft prompt) is an embedding with no words, so the judge scores
  the prompt without it: how well the images follow the words, not whether the judge knows the concept;
- the held-out real images, through the same preprocessing (with the data's ``fit``).

Metrics, raw cosines in [-1, 1] (not fractions, never shown as percentages; higher is better):

- ``clip_t``: the mean cosine of each generated image's embedding with its own prompt's (CLIP-T, as in DreamBooth);
- ``clip_i``: the mean cosine of each generated image's embedding with its *paired* real image's, the held-out image
  whose caption made the prompt. DreamBooth's CLIP-I instead averages over every pair of generated and real images of
  a subject; with captioned items the paired image is the one the prompt describes, so graytune pairs them.

The judge is used through its outputs only (``image.embeds``, ``text.embeds``: a black-box forward), so any dual
encoder works, in process or served (``hf-clip:DIR``, ``hf-siglip:DIR``, ``http://HOST:PORT``).

Mechanics only: on random weights (``arch:sd-tiny``, a tiny random CLIP) these scores mean nothing about quality;
they measure something only with a trained generator and a trained judge.

Example:
    >>> judge = graytune.open_backbone("hf-clip:openai/clip-vit-base-patch32", access="black-box")
    >>> scores = evaluate_generated(model, splits.test, task.prompts(splits.test), judge, ImageSettings(25))
    >>> scores["clip_t"], scores["clip_i"]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from graytune.access.handle import Handle
from graytune.access.images import ImageSettings, is_image_generator
from graytune.data.images import ImagePreprocess
from graytune.data.stream import PixelStream
from graytune.errors import InvalidInputError

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

#: the most held-out prompts judged when none is said (each is one sampling run of the owner's)
DEFAULT_JUDGE_IMAGES = 16
#: what a judge must publish: its two towers' embeddings
JUDGE_PORTS = ("image.embeds", "text.embeds")
#: the metrics a judge adds (``graytune.eval.scale`` keeps them out of percentages)
JUDGE_METRICS = ("clip_t", "clip_i")


def check_generator(spec: Any) -> None:
    """Refuse a backbone that cannot generate images: a judge scores generated images.

    Raises:
        InvalidInputError: ``spec`` is not a text-to-image diffusion model's.
    """
    if not is_image_generator(spec):
        raise InvalidInputError(f"a judge (--judge) scores generated images, and {spec.id} generates none: it is no "
                                "text-to-image diffusion model; give a diffusion backbone (arch:sd-tiny, "
                                "hf-diffusion:DIR), or leave the judge out")


def check_judge(spec: Any) -> None:
    """Refuse a judge without both towers' embeddings (``JUDGE_PORTS``).

    Raises:
        InvalidInputError: naming the ports ``spec`` lacks and what it has.
    """
    ports = set(spec.port_names())
    missing = [port for port in JUDGE_PORTS if port not in ports]
    if missing:
        has = sorted(p for p in ports if p.endswith(".embeds")) or "no embeddings"
        raise InvalidInputError(f"judge {spec.id} lacks {' and '.join(missing)} (it publishes {has}): a judge embeds "
                                "generated images and their prompts, so it needs both image.embeds and text.embeds; "
                                "give a dual encoder such as hf-clip:DIR or hf-siglip:DIR")


def to_pil(images: Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` images in [0, 1] as 8-bit RGB PIL images (what saving them as PNG keeps)."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def evaluate_generated(model: Any, data: Any, prompts: Sequence[str], judge: Handle,
                       settings: ImageSettings | None = None, max_images: int = DEFAULT_JUDGE_IMAGES,
                       fit: str = "crop", batch_size: int = 8) -> dict[str, Any]:
    """CLIP-T and CLIP-I of ``model``'s images for the first ``max_images`` items of ``data`` (module docstring).

    Args:
        model: an ``AdaptedModel`` on a diffusion backbone (its text edits go with the prompts).
        data: the held-out split: its images are the real ones (``data.pil(i)`` or ``data.images``).
        prompts: one per item of ``data``: the text the model is given (``DenoisingTask.prompts(data)``).
        judge: a handle with ``image.embeds`` and ``text.embeds`` (``check_judge``).
        settings: how the owner samples; image ``i`` is drawn with seed ``settings.seed + i``.
        max_images: at most this many items are judged, the split's first.
        fit: how real images become the judge's square (``crop`` or ``pad``: the data's own).
        batch_size: images and texts per judge call.

    Returns:
        ``{"judge": id, "judged_images": n, "clip_t": float, "clip_i": float, "settings": {...}}``.
    """
    check_generator(model.handle.spec)
    check_judge(judge.spec)
    if len(prompts) != len(data):
        raise InvalidInputError(f"{len(prompts)} prompts for {len(data)} held-out images; give one prompt per image")
    n = min(max_images, len(data))
    if n < 1:
        raise InvalidInputError(f"nothing to judge: {len(data)} held-out images and max_images={max_images}; "
                                "give data with a held-out image and a positive number of images")
    settings, judged = settings or ImageSettings(), list(prompts[:n])
    logger.info("judging %d generated images with %s, %d steps each", n, judge.spec.id, settings.num_inference_steps)
    preprocess = ImagePreprocess.from_spec(judge.spec, fit=fit)
    generated = generate(model, judged, settings)  # [n, 3, H, W]
    fake = embed_images(judge, preprocess(to_pil(generated)), batch_size)  # [n, E]
    real = embed_images(judge, real_pixels(data, n, preprocess), batch_size)  # [n, E]
    text = torch.cat([judge.encode_text(judged[i:i + batch_size]).float().cpu()
                      for i in range(0, n, batch_size)])  # [n, E]
    return {"judge": judge.spec.id, "judged_images": n,
            "clip_t": float(F.cosine_similarity(fake, text, dim=-1).mean()),
            "clip_i": float(F.cosine_similarity(fake, real, dim=-1).mean()),
            "settings": asdict(settings)}


def generate(model: Any, prompts: Sequence[str], settings: ImageSettings) -> Tensor:
    """``[N, 3, H, W]`` images in [0, 1]: prompt ``i`` sampled alone with seed ``settings.seed + i``."""
    images = []
    for i, prompt in enumerate(tqdm(prompts, desc="judge: generating", unit="image", leave=False, disable=None)):
        images.append(model.generate_images([prompt], replace(settings, seed=settings.seed + i)).cpu())
    return torch.cat(images)


def embed_images(judge: Handle, pixels: Tensor, batch_size: int) -> Tensor:
    """``[N, E]`` the judge's image embeddings of preprocessed ``pixels`` ``[N, 3, S, S]``."""
    return torch.cat([judge.encode_image(pixels[i:i + batch_size]).float().cpu()
                      for i in range(0, len(pixels), batch_size)])


def real_pixels(data: Any, n: int, preprocess: ImagePreprocess) -> Tensor:
    """``[n, 3, S, S]`` the first ``n`` images of ``data`` through ``preprocess``."""
    where = getattr(data, "where", None)
    if hasattr(data, "pil"):
        stream = PixelStream(data.pil, len(data), preprocess, where=where)
    else:
        stream = PixelStream.of(data.images, preprocess, where=where)
    return stream.batch(range(n))


__all__ = ["DEFAULT_JUDGE_IMAGES", "JUDGE_METRICS", "JUDGE_PORTS", "check_generator", "check_judge",
           "evaluate_generated", "to_pil"]
