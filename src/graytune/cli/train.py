"""``graytune train``: adapt a backbone to a task, select on validation, test once, save the adapter."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from graytune.config import field_docs
from graytune.model import METHODS
from graytune.train.trainer import TrainConfig
from graytune.types import AccessLevel


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an adapter through the boundary and save it",
                       description="Methods: " + "; ".join(f"{k}: {v.doc}" for k, v in METHODS.items()))
    p.add_argument("--backbone", required=True,
                   help="backbone id, e.g. bridge:efficientnet-lite0+minilm, or http://HOST:PORT of a graytune "
                        "serve (key in $GRAYTUNE_API_KEY)")
    p.add_argument("--access", default="dark-gray", choices=[lvl.label for lvl in AccessLevel])
    p.add_argument("--method", required=True, choices=[*sorted(METHODS), "transmiter+"],
                   help="transmiter+ fine-tunes a transferred TransMiter (--adapter) with --shots labels per class")
    p.add_argument("--adapter", default=None, help="transmiter+: the folder written by graytune transfer")
    p.add_argument("--shots", type=int, default=16, help="transmiter+: labelled images per class (default: 16)")
    p.add_argument("--task", choices=["retrieval", "classification", "sketch"], help="default: the data set's own")
    p.add_argument("--data", required=True,
                   help="tuxpaint, emoji, tuxpaint-sketch, fashion-mnist, wordnet-supersense, fortunes (add "
                        ":base-to-novel to a classification set), or a .csv/.jsonl of image,caption")
    p.add_argument("--out", required=True, help="folder for the adapter (a checkpoint there resumes the run)")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the spec's)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    docs = field_docs(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, type=type(f.default), default=f.default,
                       help=f"{docs.get(f.name, '')} (default: {f.default})")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from graytune.train.recipe import RunSpec, train_and_save

    if args.method == "transmiter+":
        from graytune.errors import InvalidInputError
        from graytune.transfer.recipe import run_plus

        if not args.adapter:
            raise InvalidInputError("--method transmiter+ needs --adapter: the folder written by graytune transfer")
        result = run_plus(args.adapter, args.backbone, args.data, args.out, args.shots, args.seed, args.image_size)
        print(json.dumps(result, sort_keys=True) if args.json else f"saved to {args.out}; test {result['test']}")
        return 0
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    summary = train_and_save(RunSpec(args.backbone, args.access, args.method, args.data, args.task, args.out,
                                     args.image_size, config), progress=not args.json)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, sort_keys=True))
    else:
        print(f"{summary['method']} on {summary['backbone']} ({summary['access']}), {summary['data']}: "
              f"{summary['steps']} steps, {summary['trainable_parameters']} trainable parameters")
        for key, value in summary["test"].items():
            print(f"  test {key:<32} {value:8.2f}")
        print(f"saved to {args.out}")
    return 0
