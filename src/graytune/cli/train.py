"""``graytune train``: adapt a backbone to a task, select on validation, test once, save the adapter."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from graytune.eval.scale import as_percent, label
from graytune.methods import METHODS


def add_parser(sub: argparse._SubParsersAction) -> None:
    from graytune.recipes.arguments import TRAINABLE, add_train_arguments

    p = sub.add_parser("train", help="train an adapter through the boundary and save it",
                       description="Methods: " + "; ".join(f"{k}: {METHODS[k].doc}" for k in TRAINABLE)
                       + ". graytune methods lists their levels, options and learning rates.")
    add_train_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from graytune.recipes.arguments import run_spec

    run_ = run_spec(args)  # every flag checked before a backbone loads
    if not METHODS[args.method].made_by.fits:  # TransMiter+: from a transferred artifact, not the loop
        return _transmiter_plus(args)
    from graytune.recipes.run import train_and_save
    from graytune.train.loop import Terminated

    try:
        summary = train_and_save(run_, progress=True)  # the bar and validation lines go to stderr, --json or not
    except Terminated:  # the checkpoint is written and said; exit as a process ended by SIGTERM does
        print("graytune train: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    if args.json:  # the validation history and best step included
        print(json.dumps(summary, sort_keys=True))
    else:
        if summary.get("data_note"):
            print(f"note: {summary['data_note']}")
        print(f"{summary['method']} on {summary['backbone']} ({summary['access']}), {summary['data']} "
              f"({sizes(summary['split_sizes'])}): {summary['steps']} steps at lr {summary['lr']:g}, "
              f"{summary['trainable_parameters']} trainable parameters")
        for key, value in as_percent(summary["test"]).items():
            print(f"  test {label(key):<34} {value:8.2f}")
        calls = summary["calls"]
        if calls.get("train"):
            evaluations = calls.get("train_evaluations")
            print(f"  forward calls, one per tower forward: {calls['train']} training ({calls['train_samples']} "
                  f"samples), {calls['val']} validation, {calls['test']} test"
                  + (f"; training model evaluations (ZIP's and BlackVIP's calls): {evaluations}"
                     if evaluations is not None and evaluations >= 0 else "")
                  + ("; stopped at --max-calls" if summary["stopped"] == "max_calls" else ""))
        print(f"saved to {args.out}")
    return 0


def sizes(split_sizes: dict[str, int | None]) -> str:
    """``train 200 / val 40 / test 60 items`` (a split the run has not: left out)."""
    return " / ".join(f"{k} {v}" for k, v in split_sizes.items() if v is not None) + " items"


def _transmiter_plus(args: argparse.Namespace) -> int:
    """TransMiter+ with the flags that mean something for it; the others are refused, not ignored."""
    from graytune.artifacts import prepare_out
    from graytune.errors import InvalidInputError
    from graytune.recipes.arguments import given_train_fields
    from graytune.recipes.transmiter import run_plus
    from graytune.transfer.transmiter import PlusConfig

    if not args.adapter:
        raise InvalidInputError("--method transmiter+ needs --adapter: the folder written by graytune transfer")
    given = given_train_fields(args)
    refused = [f"--{k.replace('_', '-')}" for k in ("grad_accum", "eval_every", "patience", "max_calls", "zo", "zo_q",
                                                    "zo_eps", "zo_dim", "zo_momentum") if k in given]
    refused += [flag for flag, value in (("--option", args.option), ("--task", args.task), ("--train", args.train),
                                         ("--val", args.val), ("--test", args.test)) if value]
    refused += [flag for flag, value in (("--workers", args.workers), ("--cache-mb", args.cache_mb),
                                         ("--retry-s", args.retry_s), ("--device", args.device),
                                         ("--dtype", args.dtype)) if value is not None]
    if args.recompute:
        refused.append("--recompute")
    if args.log != "jsonl":
        refused.append("--log")
    if args.access not in (None, "black-box"):
        refused.append("--access")
    if refused:
        raise InvalidInputError(f"--method transmiter+ does not use {', '.join(refused)}: it fine-tunes a logit "
                                "adapter at black-box, validating after each pass; it takes --lr, --max-steps, "
                                "--batch-size, --weight-decay, --warmup, --seed, --shots and --image-size")
    prepare_out(args.out, args.overwrite)  # a finished adapter or other files there: refused unless --overwrite
    config = PlusConfig(**{k: v for k, v in given.items() if k in ("lr", "max_steps", "batch_size", "weight_decay",
                                                                  "warmup")})
    result = run_plus(args.adapter, args.backbone, args.data, args.out, args.shots or 16, given.get("seed", 0),
                      args.image_size, config)
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    best, train = result["best_val"], result["train"]
    print(f"transmiter+ on {args.backbone} (black-box), {args.data} ({args.shots or 16} labelled per class): "
          f"{int(best['steps'])} steps at lr {train['lr']:g}; kept pass {int(best['epoch'])}"
          f"{' (as transferred)' if not best['epoch'] else ''}, val accuracy % {100 * best['val_accuracy']:.2f}")
    for key, value in as_percent(result["test"]).items():
        print(f"  test {label(key):<34} {value:8.2f}")
    print(f"saved to {args.out}")
    return 0
