"""``graytune eval``: test metrics of a saved adapter of any method (or of the zero-shot backbone)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    from graytune.eval.judge import DEFAULT_JUDGE_IMAGES
    from graytune.recipes.arguments import TASKS, add_data_arguments, add_placement_arguments, positive_int

    p = sub.add_parser("eval", help="evaluate a saved adapter on a data set's test split",
                       description="Score a saved adapter of any method (or, without --adapter, the zero-shot "
                                   "backbone) on a data set: a built-in set's test split, a file's own test split, "
                                   "or a file without splits whole. The artifact's config says everything needed "
                                   "(method, options, access level, backbone, image size).")
    p.add_argument("--backbone", default=None,
                   help="an id, or http://HOST:PORT of a graytune serve (key in $GRAYTUNE_API_KEY) (default: the "
                        "backbone the adapter records; needed without --adapter)")
    p.add_argument("--adapter", default=None, help="folder written by graytune train or transfer (omit for "
                                                   "zero-shot); its config says everything else")
    p.add_argument("--task", choices=TASKS, help="default: the data set's own")
    add_data_arguments(p, required=True)
    p.add_argument("--split", choices=["test", "val", "all"], default=None,
                   help="which split to score: test, val, or all (a file of yours scored whole). Default: the test "
                        "split of a built-in set or of a file that carries splits (a split column, Karpathy's); a "
                        "file without splits scored whole. test or val on such a file scores the part that "
                        "graytune train --data FILE holds out (re-split 70/10/20 with seed 0)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="default: the size the adapter was trained at")
    add_placement_arguments(p, recompute=False)
    p.add_argument("--judge", default=None,
                   help="a diffusion model only: a dual encoder's id (hf-clip:DIR, hf-siglip:DIR, or a served "
                        "one's http://HOST:PORT), opened black-box, that scores images the model draws for the "
                        "scored split's prompts: clip_t (generated image vs its prompt) and clip_i (vs its paired "
                        "real image), mean cosines in [-1, 1], beside the denoising loss")
    p.add_argument("--judge-images", type=positive_int, default=None,
                   help="with --judge: how many scored prompts get an image, the split's first (default "
                        f"{DEFAULT_JUDGE_IMAGES}); image i is drawn with seed i")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="with --judge: denoising steps per image (default 50, diffusers' default); images are "
                        "drawn at the size the adapter was trained at (or --image-size), guidance 7.5")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from graytune.artifacts import read_config
    from graytune.errors import InvalidInputError
    from graytune.methods import MethodKind, get_method
    from graytune.recipes.arguments import refuse_image_flags
    from graytune.recipes.evaluate import evaluate_saved

    refuse_image_flags(args, args.data)  # before anything loads
    judge_flags = [flag for flag, value in (("--judge-images", args.judge_images), ("--steps", args.steps))
                   if value is not None]
    if judge_flags and args.judge is None:
        raise InvalidInputError(f"{' and '.join(judge_flags)} set how a judge scores generated images; give "
                                "--judge hf-clip:DIR (a dual encoder) with them, or leave them out")
    saved = read_config(args.adapter) if args.adapter else None
    if args.backbone is None:
        if saved is None or not saved.get("backbone"):
            raise InvalidInputError("give --backbone: zero-shot (no --adapter) scores a backbone you name" if saved
                                    is None else f"{args.adapter} records no backbone; give --backbone")
        args.backbone = saved["backbone"]
    method = get_method(saved["method"]) if saved else get_method("zero-shot")
    if method.kind is MethodKind.LOGIT:
        from graytune.recipes.transmiter import evaluate_transmiter

        loader_flags = args.workers is not None or args.cache_mb is not None
        placed = args.device is not None or args.dtype is not None
        if (args.task not in (None, "classification") or args.split not in (None, "test") or loader_flags or placed
                or args.judge is not None):
            raise InvalidInputError(f"{args.adapter} is a {method.name} logit adapter: it is scored on the test "
                                    "split of a classification set; --task, --split, --workers, --cache-mb, "
                                    "--device, --dtype and --judge do not apply")
        result = evaluate_transmiter(args.adapter, args.backbone, args.data, args.image_size)
    else:
        from graytune.recipes.arguments import loader_config, placement

        where = placement(args)
        result = evaluate_saved(args.backbone, args.adapter, args.data, args.task, args.image_size, args.split,
                                loader_config(args), where["device"], where["dtype"], **judge_options(args))
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        if result.get("data_note"):
            print(f"note: {result['data_note']}")
        split = result.get("split", "test")  # a logit adapter is scored on the test split
        scored = "whole" if split == "all" else f"{split} split"
        items = f" ({result['items']} items)" if "items" in result else ""
        print(f"{result['method']} on {result['backbone']}, {result['data']} {scored}{items}:")
        if "judge" in result:
            steps = result["judge_settings"]["num_inference_steps"]
            print(f"  clip_t, clip_i: mean cosines by {result['judge']} of {result['judged_images']} generated "
                  f"images ({steps} steps each) with their prompts and paired real images")
        from graytune.eval.scale import as_percent, label

        for key, value in as_percent(result["test"]).items():
            print(f"  {label(key):<34} {value:8.2f}")
    return 0


def judge_options(args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    """``evaluate_saved``'s judge keywords from the flags (none without --judge)."""
    if args.judge is None:
        return {}
    from graytune.access.images import ImageSettings
    from graytune.eval.judge import DEFAULT_JUDGE_IMAGES

    settings = ImageSettings() if args.steps is None else ImageSettings(num_inference_steps=args.steps)
    return {"judge": args.judge, "judge_images": args.judge_images or DEFAULT_JUDGE_IMAGES, "judge_settings": settings}
