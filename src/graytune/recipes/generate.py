"""``graytune generate``'s program: a language model (with an adapter or without) writes after a prompt, or a
text-to-image diffusion model draws each prompt (``paint``; the grid is ``graytune.recipes.image_grid``'s).

The owner decodes with a key–value cache (in process, or on a ``graytune serve``); an adapter whose
edit reaches every input token (a shift, AdaLink) reaches the generated tokens too. With ``chat``
the prompt is sent as one user message through the backbone's chat template.

Example:
    >>> model = open_generator("smollm2-135m", adapter="out/prompt")
    >>> write(model, "Definition: a young cat\\nWord:", GenerationSettings(max_new_tokens=4)).texts
    [' kitten']
    >>> painter = open_generator("arch:sd-tiny")
    >>> paint(painter, ["a red circle"], ImageSettings(num_inference_steps=10)).shape
    torch.Size([1, 3, 64, 64])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from graytune.access.generation import Generated
from graytune.access.images import ImageSettings, generate_images, is_image_generator
from graytune.artifacts import load_adapter, read_config
from graytune.errors import InvalidInputError
from graytune.methods import artifact_method, backbone_kind
from graytune.model import AdaptedModel
from graytune.recipes.run import open_for
from graytune.train.completions import render_chat
from graytune.types import AccessLevel, BackboneSpec, GenerationSettings


#: what ``open_generator`` opened: a language model writes, a diffusion model paints
WRITES, PAINTS = "causal-lm", "diffusion"


def open_generator(backbone: str, adapter: str | None = None, access: str | None = None,
                   device: str | None = None, dtype: str | None = None) -> AdaptedModel:
    """The adapted language or diffusion model of ``adapter`` (or the zero-shot one), opened at the level it needs.

    Raises:
        InvalidInputError: the backbone neither writes nor paints (an encoder).
    """
    config = read_config(adapter) if adapter else {"method": "zero-shot", "access": "black-box"}
    method = artifact_method(config)
    level = max(AccessLevel.parse(access or config["access"]), method.min_access)
    extra = {} if backbone.startswith(("http://", "https://")) else {"device": device, "dtype": dtype}
    handle = open_for(backbone, level.label, method.name, **extra)
    if generator_kind(handle.spec) is None:
        raise InvalidInputError(f"{handle.spec.id} is neither a language model nor a text-to-image diffusion model, "
                                "so it cannot generate; give a causal LM (smollm2-135m, qwen2.5-0.5b, hf-causal:DIR) "
                                "or a diffusion backbone (arch:sd-tiny, hf-diffusion:DIR)")
    return load_adapter(adapter, handle) if adapter else AdaptedModel.build(handle, "zero-shot")


def generator_kind(spec: BackboneSpec) -> str | None:
    """``WRITES`` for a language model, ``PAINTS`` for a diffusion model, None for a backbone that does neither."""
    if is_image_generator(spec):
        return PAINTS
    return WRITES if backbone_kind(spec) == "causal-lm" else None


def paint(model: AdaptedModel, prompts: Sequence[str], settings: ImageSettings) -> torch.Tensor:
    """``[B, 3, H, W]`` images in [0, 1] that ``model`` (a diffusion model, its text adapters' edits on the
    prompts) draws for ``prompts``, the owner sampling."""
    return generate_images(model, list(prompts), settings)


def write(model: AdaptedModel, prompt: str, settings: GenerationSettings, chat: bool = False,
          on_text: Callable[[str], None] | None = None) -> Generated:
    """What ``model`` writes after ``prompt``; ``on_text`` gets the text as it grows (in process: per token)."""
    text_spec = model.handle.spec.preprocess.get("text", {})
    if chat:
        template = text_spec.get("chat_template")
        if not template:
            raise InvalidInputError(f"{model.handle.spec.id} publishes no chat template; drop --chat and write the "
                                    "prompt as the model expects it")
        prompt = render_chat(template, [{"role": "user", "content": prompt}], text_spec)
    stream = (lambda texts: on_text(texts[0])) if on_text is not None else None
    return model.generate([prompt], settings, stream=stream)
