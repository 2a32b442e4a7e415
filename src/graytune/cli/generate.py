"""``graytune generate``: a language model behind the boundary writes after a prompt, streamed to the terminal; a
text-to-image diffusion model draws each prompt into a PNG grid, captioned (``--out``)."""

from __future__ import annotations

import argparse
import json
import sys

#: flags only a language model takes, and flags only a diffusion model takes (``dest`` → flag)
TEXT_ONLY = {"chat": "--chat", "max_new_tokens": "--max-new-tokens", "temperature": "--temperature",
             "top_p": "--top-p"}
IMAGE_ONLY = {"out": "--out", "steps": "--steps", "guidance": "--guidance", "size": "--size",
              "negative_prompt": "--negative-prompt", "overwrite": "--overwrite"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    from graytune.recipes.arguments import add_placement_arguments, non_negative_float, non_negative_int, positive_int

    p = sub.add_parser("generate", help="generate text with a language model, or images with a diffusion model "
                                        "(and an adapter trained for it)",
                       description="A language model: the owner decodes with a key-value cache; an adapter's shift or "
                                   "AdaLink map reaches the generated tokens too; tokens are printed as they come. A "
                                   "diffusion model: the owner samples one image per --prompt, the adapter's edits on "
                                   "the prompts, and a PNG grid with each prompt under its image is written to --out.")
    p.add_argument("--backbone", required=True, help="a causal LM id (smollm2-135m, qwen2.5-0.5b, hf-causal:DIR), a "
                                                     "diffusion model (arch:sd-tiny, hf-diffusion:DIR) or "
                                                     "http://HOST:PORT of a graytune serve (key in $GRAYTUNE_API_KEY)")
    p.add_argument("--adapter", default=None, help="folder written by graytune train (omit for the plain model)")
    p.add_argument("--access", default=None, help="level to open the backbone at (default: the adapter's)")
    p.add_argument("--prompt", required=True, action="append",
                   help="the text to continue (a language model: one); what to draw (a diffusion model: repeat the "
                        "flag for several images)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the sampling draws (or initial latents)")
    text = p.add_argument_group("language models")
    text.add_argument("--chat", action="store_true", default=None,
                      help="send the prompt as a user message through the backbone's chat template")
    text.add_argument("--max-new-tokens", type=positive_int, default=None, help="tokens to write at most (default 64)")
    text.add_argument("--temperature", type=non_negative_float, default=None,
                      help="0 (default) decodes greedily; above 0 samples at that temperature")
    text.add_argument("--top-p", type=float, default=None, help="sampling keeps the most likely tokens up to this "
                                                                 "probability mass (default 1: all)")
    image = p.add_argument_group("diffusion models")
    image.add_argument("--out", default=None, help="the PNG grid to write (needed for a diffusion model)")
    image.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default 50)")
    image.add_argument("--guidance", type=non_negative_float, default=None,
                       help="classifier-free guidance scale (default 7.5; at most 1: no guidance)")
    image.add_argument("--size", type=positive_int, default=None,
                       help="image height and width in pixels, a multiple of the VAE's factor (default: the model's)")
    image.add_argument("--negative-prompt", default=None, help="what guidance steers away from (default: '')")
    image.add_argument("--overwrite", action="store_true", default=None, help="replace --out if it exists")
    add_placement_arguments(p, recompute=False)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from graytune.recipes.arguments import placement
    from graytune.recipes.generate import PAINTS, generator_kind, open_generator
    from graytune.recipes.image_grid import check_out

    if args.out is not None:
        check_out(args.out, bool(args.overwrite))  # before any backbone is opened
    where = placement(args)
    model = open_generator(args.backbone, args.adapter, args.access, where.get("device"), where.get("dtype"))
    paints = generator_kind(model.handle.spec) == PAINTS
    check_flags(args, paints, model.handle.spec.id)
    return draw(args, model) if paints else write_text(args, model)


def check_flags(args: argparse.Namespace, paints: bool, backbone: str) -> None:
    """Refuse flags of the other kind of model, and what this kind needs but did not get."""
    from graytune.errors import InvalidInputError

    wrong = [flag for dest, flag in (TEXT_ONLY if paints else IMAGE_ONLY).items() if getattr(args, dest) is not None]
    kind, other = ("a diffusion model", "language models") if paints else ("a language model", "diffusion models")
    if wrong:
        raise InvalidInputError(f"{' and '.join(wrong)} {'apply' if len(wrong) > 1 else 'applies'} to {other}; "
                                f"{backbone} is {kind}: leave {'them' if len(wrong) > 1 else 'it'} out")
    if paints and args.out is None:
        raise InvalidInputError(f"{backbone} is a diffusion model: give --out GRID.png, where the images go")
    if not paints and len(args.prompt) > 1:
        raise InvalidInputError(f"{backbone} is a language model and continues one --prompt; got "
                                f"{len(args.prompt)}: run once per prompt")


def write_text(args: argparse.Namespace, model: object) -> int:
    from graytune.recipes.generate import write
    from graytune.types import GenerationSettings

    settings = GenerationSettings(64 if args.max_new_tokens is None else args.max_new_tokens,
                                  args.temperature or 0.0, 1.0 if args.top_p is None else args.top_p, args.seed)
    printed = 0

    def show(text: str) -> None:
        nonlocal printed
        if text.startswith(text[:printed]) and len(text) > printed:  # a token may change how earlier bytes decode
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)

    out = write(model, args.prompt[0], settings, chat=bool(args.chat),  # type: ignore[arg-type]
                on_text=None if args.json else show)
    if args.json:
        print(json.dumps({"text": out.texts[0], "tokens": int(out.lengths[0]), "ids": out.ids[0][:int(out.lengths[0])]
                          .tolist(), "backbone": model.handle.spec.id, "method": model.method},  # type: ignore
                         sort_keys=True))
    else:
        show(out.texts[0])
        print()
    return 0


def draw(args: argparse.Namespace, model: object) -> int:
    from graytune.access.images import ImageSettings
    from graytune.errors import InvalidInputError
    from graytune.recipes.generate import paint
    from graytune.recipes.image_grid import save_grid

    try:
        settings = ImageSettings(**{key: value for key, value in (
            ("num_inference_steps", args.steps), ("guidance_scale", args.guidance), ("seed", args.seed),
            ("height", args.size), ("width", args.size), ("negative_prompt", args.negative_prompt))
            if value is not None})
        images = paint(model, args.prompt, settings)  # type: ignore[arg-type]
    except InvalidInputError as err:
        raise InvalidInputError(as_flags(str(err))) from None
    out = save_grid(images, args.prompt, args.out, overwrite=bool(args.overwrite))
    if args.json:
        print(json.dumps({"out": str(out), "prompts": args.prompt, "size": list(images.shape[-2:]),
                          "backbone": model.handle.spec.id, "method": model.method},  # type: ignore[attr-defined]
                         sort_keys=True))
    else:
        count = len(args.prompt)
        print(f"wrote {out} ({count} image{'s' if count != 1 else ''} of {images.shape[-2]} x {images.shape[-1]})")
    return 0


#: the sampling settings' names as ``graytune generate`` spells them
FLAGS = {"num_inference_steps": "--steps", "guidance_scale": "--guidance", "height": "--size", "width": "--size",
         "negative_prompt": "--negative-prompt"}


def as_flags(message: str) -> str:
    """``message`` with each sampling setting named by the flag that set it (``--steps (num_inference_steps)``)."""
    import re

    return re.sub(r"\b(" + "|".join(FLAGS) + r")\b", lambda m: f"{FLAGS[m.group(1)]} ({m.group(1)})", message)
