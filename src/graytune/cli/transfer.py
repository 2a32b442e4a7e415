"""``graytune extract`` and ``graytune transfer``: TransMiter from a weak backbone to a stronger one."""

from __future__ import annotations

import argparse
import json

from graytune.transfer.classes import DEFAULT_DRAW, DRAWS


def add_parser(sub: argparse._SubParsersAction) -> None:
    from graytune.recipes.arguments import non_negative_float, non_negative_int, positive_int

    e = sub.add_parser("extract", help="TransMiter: distil a weak fine-tuned adapter into a logit adapter (no labels)",
                       description="TransMiter's first step: on a data set's training items, labels unused, learn a "
                                   "logit adapter that maps the weak backbone's zero-shot class scores (task plus "
                                   "auxiliary classes) to those of its fine-tuned adapter. Only class scores cross "
                                   "the boundary (black-box). Then graytune transfer moves it to a stronger backbone.")
    e.add_argument("--weak", required=True, help="the weak backbone the adapter was trained on")
    e.add_argument("--adapter", required=True, help="the weak backbone's fine-tuned adapter (graytune train --out)")
    e.add_argument("--data", required=True, help="an image or text classification set (text sets on text "
                                                 "encoders); its training items, labels unused")
    e.add_argument("--out", required=True, help="folder for the TransMiter adapter (with its class list)")
    e.add_argument("--classes", type=positive_int, default=1024,
                   help="M: task plus auxiliary classes (default: 1024)")
    e.add_argument("--aux-draw", choices=DRAWS, default=DEFAULT_DRAW,
                   help="how the auxiliary class names are drawn from WordNet's nouns: balanced (equally from "
                        "its noun categories, the task's own left out; the paper's sampling) or concrete (from "
                        f"five concrete categories, the draw before issue 32) (default: {DEFAULT_DRAW})")
    e.add_argument("--image-size", type=positive_int, default=None,
                   help="image side in pixels for image sets (default: the weak backbone's); refused for texts")
    e.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the auxiliary class draw, the adapter's initial weights and the batch order "
                        "(default: 0)")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object (with the loss per "
                                                        "epoch)")
    e.add_argument("--overwrite", action="store_true", help="replace a finished adapter in --out")
    e.set_defaults(run=run_extract)
    t = sub.add_parser("transfer", help="TransMiter: move an extracted adapter to a stronger backbone, forward only",
                       description="TransMiter's second step: align the weak and the strong backbone's class scores "
                                   "on the training items (labels unused) by a closed-form orthogonal basis change, "
                                   "and apply the extracted adapter in the strong backbone's basis. Forward calls "
                                   "only; the result is tested on the test split and saved. graytune train --method "
                                   "transmiter+ fine-tunes it with a few labels.")
    t.add_argument("--adapter", required=True, help="folder written by graytune extract")
    t.add_argument("--strong", required=True, help="the stronger backbone")
    t.add_argument("--data", required=True, help="the same data set; its training images or texts, labels unused")
    t.add_argument("--out", required=True, help="folder for the transferred adapter (graytune eval and train "
                                                "--method transmiter+ take it)")
    t.add_argument("--beta", type=non_negative_float, default=500.0,
                   help="pull of the basis change towards the identity (>= 0; default: 500, the authors' value "
                   "for their pool size)")
    t.add_argument("--beta-per-sample", type=non_negative_float, default=None,
                   help="instead of --beta, β = this × N (N: the unlabeled queries), so that the pull keeps its "
                   "weight against the data term, which grows with N (e.g. 0.625: 500 at N = 800)")
    t.add_argument("--image-size", type=positive_int, default=None,
                   help="image side in pixels for image sets (default: the size the adapter was extracted at)")
    t.add_argument("--json", action="store_true", help="print the result as one JSON object")
    t.add_argument("--overwrite", action="store_true", help="replace a finished adapter in --out")
    t.set_defaults(run=run_transfer)


def _print(result: dict, as_json: bool) -> None:
    """One line per field; test metrics as the labelled percentages other commands print, a loss per epoch as
    its first and last values (``--json`` keeps every value)."""
    from graytune.eval.scale import as_percent, label

    if as_json:
        print(json.dumps(result, sort_keys=True))
        return
    for key, value in result.items():
        if key == "test":
            for name, number in as_percent(value).items():
                print(f"test {label(name):<34} {number:8.2f}")
        elif isinstance(value, list) and value:
            print(f"{key:<20} {value[0]:.4f} at epoch 1, {value[-1]:.4f} at epoch {len(value)}")
        elif isinstance(value, float):
            print(f"{key:<20} {value:.2f}")
        else:
            print(f"{key:<20} {value}")


def run_extract(args: argparse.Namespace) -> int:
    from graytune.artifacts import prepare_out
    from graytune.recipes.transmiter import run_extract as extract

    prepare_out(args.out, args.overwrite)  # never deletes what graytune did not write
    _print(extract(args.weak, args.adapter, args.data, args.out, args.classes, args.seed, args.image_size,
                   args.aux_draw), args.json)
    return 0


def run_transfer(args: argparse.Namespace) -> int:
    from graytune.artifacts import prepare_out
    from graytune.recipes.transmiter import run_transfer as transfer

    prepare_out(args.out, args.overwrite)  # never deletes what graytune did not write
    _print(transfer(args.adapter, args.strong, args.data, args.out, args.beta, args.image_size,
                    args.beta_per_sample), args.json)
    return 0
