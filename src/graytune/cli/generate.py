"""``graytune generate``: a language model behind the boundary writes after a prompt, streamed to the terminal."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    from graytune.recipes.arguments import add_placement_arguments, non_negative_float, non_negative_int, positive_int

    p = sub.add_parser("generate", help="generate text with a language model (and an adapter trained for it)",
                       description="The owner decodes with a key-value cache; an adapter's shift or AdaLink map "
                                   "reaches the generated tokens too. Tokens are printed as they come.")
    p.add_argument("--backbone", required=True, help="a causal LM id (smollm2-135m, qwen2.5-0.5b, hf-causal:DIR) or "
                                                     "http://HOST:PORT of a graytune serve (key in $GRAYTUNE_API_KEY)")
    p.add_argument("--adapter", default=None, help="folder written by graytune train (omit for the plain model)")
    p.add_argument("--access", default=None, help="level to open the backbone at (default: the adapter's)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through the backbone's "
                                                       "chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to write at most (default 64)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="0 (default) decodes greedily; above 0 samples at that temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling keeps the most likely tokens up to this "
                                                             "probability mass (default 1: all)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the sampling draws")
    add_placement_arguments(p, recompute=False)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from graytune.recipes.arguments import placement
    from graytune.recipes.generate import open_generator, write
    from graytune.types import GenerationSettings

    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    where = placement(args)
    model = open_generator(args.backbone, args.adapter, args.access, where.get("device"), where.get("dtype"))
    printed = 0

    def show(text: str) -> None:
        nonlocal printed
        if text.startswith(text[:printed]) and len(text) > printed:  # a token may change how earlier bytes decode
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)

    out = write(model, args.prompt, settings, chat=args.chat, on_text=None if args.json else show)
    if args.json:
        print(json.dumps({"text": out.texts[0], "tokens": int(out.lengths[0]), "ids": out.ids[0][:int(out.lengths[0])]
                          .tolist(), "backbone": model.handle.spec.id, "method": model.method}, sort_keys=True))
    else:
        show(out.texts[0])
        print()
    return 0
