"""A diffusion model's task: learn a concept or a style from images, with the denoising loss.

Each training image is encoded once by the owner's VAE (``image.latents``, forward only: the client never holds
the VAE); each step draws noise and timesteps, makes the noisy latents with the scheduler's forward process
(``DDPMScheduler`` built from the configuration the spec publishes, as diffusers' training scripts build theirs),
and asks the boundary for the UNet's prediction conditioned on the prompts as the adapters edit them. Loss: the
mean squared error to the scheduler's target (the noise, or ``v`` for v-prediction models).

Prompts: each image's caption (or class name) put into a template (``{}`` marks its place; default ``Splits.prompt``,
or ``graytune train --template``); an image without either gets the template with ``{}`` empty ("a picture of ").
The adapter's own token, DGA's extra token or a soft prompt, goes in before the end token, where textual inversion's
placeholder word would stand. With several templates each training row draws one per step, as textual inversion
draws from its list; validation and test use the first.

Evaluation is honest without a judge: ``denoise_mse``, the held-out denoising loss at noise and timesteps fixed by
the item's index (``EVAL_TIMESTEPS`` spread over the schedule), the same for every method and run, and
``denoise_score`` = ``-denoise_mse`` for selection (higher is better).

Example:
    >>> task = DenoisingTask(splits.train, handle, "a picture of {}")
    >>> loss = task.loss(model, next(task.batches(4, generator)))
    >>> task.evaluate(model, splits.test)["denoise_mse"]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from graytune.access import Handle
from graytune.access.images import model_size
from graytune.data.images import ImagePreprocess
from graytune.data.stream import LoaderConfig
from graytune.errors import InvalidInputError
from graytune.model import AdaptedModel
from graytune.types import BackboneSpec
from graytune.train.tasks import epoch_batches, image_stream

Tensor = torch.Tensor
#: timesteps each held-out image is scored at, as fractions of the schedule (early, middle and late noise)
EVAL_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)
#: the seed of the held-out noise: every run and method is scored on the same noisy latents
EVAL_SEED = 20231
#: the most templates a task takes, and the most characters in one
MAX_TEMPLATES, MAX_TEMPLATE_CHARS = 64, 1000


class DenoisingTask:
    """Concept or style learning for a text-to-image diffusion model behind the boundary (module docstring)."""

    primary = "denoise_score"

    def __init__(self, data: Any, handle: Handle, prompt: str | Sequence[str] = "{}", image_size: int | None = None,
                 fit: str = "crop", loader: LoaderConfig | None = None, eval_batch: int = 8) -> None:
        self.templates = check_templates([prompt] if isinstance(prompt, str) else list(prompt))
        self.data, self.handle, self.prompt, self.eval_batch = data, handle, self.templates[0], eval_batch
        latents = handle.spec.preprocess["latents"]
        self.schedule = noise_schedule(latents["scheduler"]["config"])
        self.prediction = str(latents["prediction_type"])
        self.preprocess = ImagePreprocess(image_side(handle.spec, image_size), fit, (0.5, 0.5, 0.5),
                                          (0.5, 0.5, 0.5))  # [0, 1] -> [-1, 1]
        self.loader = loader or LoaderConfig()
        self._cache: dict[int, tuple[Tensor, dict[str, Tensor]]] = {}
        self.latents, self.tokens = self.encode(data)
        self.more_tokens = [handle.tokenize(self.prompts(data, t)) for t in self.templates[1:]]  # templates 2..T

    def __len__(self) -> int:
        return len(self.data)

    def prompts(self, data: Any, template: str | None = None) -> list[str]:
        """Each image's prompt: its first caption or its class name in ``template`` (default: the first)."""
        template = self.prompt if template is None else template
        if hasattr(data, "caption_image"):
            first: dict[int, str] = {}
            for caption, image in zip(data.captions, data.caption_image):
                first.setdefault(image, caption)
            words = [first.get(i, "") for i in range(len(data))]
        elif hasattr(data, "class_names"):
            words = [data.class_names[int(y)] for y in data.labels.tolist()]
        else:
            words = [""] * len(data)
        return [template.replace("{}", w) if "{}" in template else f"{template} {w}".strip() for w in words]

    def encode(self, data: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """``data``'s latents ``[N, C, h, w]`` (the owner's VAE, once) and tokenized prompts ``[N, L]``."""
        key = id(data)
        if key not in self._cache:
            chunks = [self.handle.forward({"image.pixels": pixels}, outputs=["image.latents"])["image.latents"]
                      for pixels in image_stream(data, self.preprocess, self.loader).sequential(self.eval_batch)]
            self._cache[key] = (torch.cat(chunks).cpu(), self.handle.tokenize(self.prompts(data)))
        return self._cache[key]

    def batches(self, batch_size: int, generator: torch.Generator, shard: tuple[int, int] = (0, 1)
                ) -> Iterator[dict[str, Tensor]]:
        for idx in epoch_batches(len(self.data), batch_size, generator, shard):
            clean = self.latents[idx]
            noise = torch.randn(clean.shape, generator=generator)
            steps = torch.randint(0, len(self.schedule), (len(idx),), generator=generator)
            yield self.noised(clean, noise, steps, self.row_tokens(idx, generator))

    def row_tokens(self, idx: list[int], generator: torch.Generator) -> dict[str, Tensor]:
        """The prompts' tokens of rows ``idx``: with several templates, each row's drawn from them."""
        tokens = {k: v[idx] for k, v in self.tokens.items()}
        if self.more_tokens:
            choice = torch.randint(0, len(self.templates), (len(idx),), generator=generator)
            for row, (i, pick) in enumerate(zip(idx, choice.tolist())):
                if pick:
                    for k in tokens:
                        tokens[k][row] = self.more_tokens[pick - 1][k][i]
        return tokens

    def noised(self, clean: Tensor, noise: Tensor, steps: Tensor, tokens: dict[str, Tensor]) -> dict[str, Tensor]:
        """One batch: the prompts' tokens, ``latents.noisy`` and ``timestep`` for the boundary, and ``target``."""
        alpha = self.schedule[steps].sqrt().view(-1, 1, 1, 1)  # sqrt(alpha_bar_t)
        sigma = (1 - self.schedule[steps]).sqrt().view(-1, 1, 1, 1)
        target = noise if self.prediction == "epsilon" else alpha * noise - sigma * clean  # v-prediction
        return {**tokens, "latents.noisy": alpha * clean + sigma * noise, "timestep": steps, "target": target}

    def loss(self, model: AdaptedModel, batch: dict[str, Tensor]) -> Tensor:
        prediction = model.predict_noise(batch)
        return F.mse_loss(prediction, batch["target"].to(prediction.device))

    @torch.no_grad()
    def evaluate(self, model: AdaptedModel, data: Any) -> dict[str, float]:
        total, count = 0.0, 0
        for batch in self.held_out(data):
            prediction = model.predict_noise(batch)
            total += float(F.mse_loss(prediction, batch["target"].to(prediction.device), reduction="sum"))
            count += prediction.numel()
        mse = total / max(1, count)
        return {"denoise_score": -mse, "denoise_mse": mse}

    def held_out(self, data: Any) -> Iterator[dict[str, Tensor]]:
        """``data`` at ``EVAL_TIMESTEPS`` with noise fixed by ``EVAL_SEED``: the same batches for every method."""
        latents, tokens = self.encode(data)
        n, k = len(latents), len(EVAL_TIMESTEPS)
        steps = torch.tensor([int(f * (len(self.schedule) - 1)) for f in EVAL_TIMESTEPS]).repeat(n)  # [N*K]
        rows = torch.arange(n).repeat_interleave(k)
        noise = torch.randn((n * k, *latents.shape[1:]), generator=torch.Generator().manual_seed(EVAL_SEED))
        for start in range(0, n * k, self.eval_batch):
            part = slice(start, start + self.eval_batch)
            yield self.noised(latents[rows[part]], noise[part], steps[part], {k_: v[rows[part]]
                                                                               for k_, v in tokens.items()})


def image_side(spec: BackboneSpec, asked: int | None) -> int:
    """The side images are trained at: ``asked`` (default the model's own), a multiple of the VAE's factor and at most
    twice the model's own size, the bound sampling applies (``graytune.access.images.model_size``); checked before
    any image is read."""
    height, width, factor = model_size(spec)
    own = min(height, width)
    size, most = asked or own, 2 * own
    if size % factor or size > most:
        raise InvalidInputError(f"--image-size: got {size}; {spec.id} takes images whose side is a multiple of "
                                f"{factor}, at most {most} (twice its own {own}): give --image-size such a number")
    return int(size)


def check_templates(templates: list[str]) -> list[str]:
    """Prompt templates, each at most ``MAX_TEMPLATE_CHARS`` characters, 1 to ``MAX_TEMPLATES`` of them.

    Raises:
        InvalidInputError: none, too many, or one too long or with ``{}`` more than once.
    """
    problems = [f"template {i + 1} has {len(t):,} characters (at most {MAX_TEMPLATE_CHARS:,})"
                for i, t in enumerate(templates) if len(t) > MAX_TEMPLATE_CHARS]
    problems += [f"template {i + 1} ({t!r}) has {{}} {t.count('{}')} times (once at most: it is where each "
                 "image's caption goes)" for i, t in enumerate(templates) if t.count("{}") > 1]
    if not 1 <= len(templates) <= MAX_TEMPLATES:
        problems.append(f"got {len(templates)} templates; give 1 to {MAX_TEMPLATES}")
    if problems:
        raise InvalidInputError("prompt templates refused: " + "; ".join(problems) + ". A template is the prompt "
                                "with {} where each image's caption goes, e.g. 'a painting in the style of {}'")
    return templates


def noise_schedule(config: dict[str, Any]) -> Tensor:
    """``[T]`` alpha-bar (cumulative products of 1 - beta) of the scheduler configuration a diffusion spec publishes,
    as diffusers' ``DDPMScheduler`` computes them for training."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    scheduler = DDPMScheduler(**{k: config[k] for k in keys if config.get(k) is not None})
    return scheduler.alphas_cumprod.to(torch.float32)


