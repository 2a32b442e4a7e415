"""The flags of a training run, shared by ``graytune train`` and the DDP entry point (``python -m graytune.recipes.ddp``).

Bad values are refused at parse time (argparse's usage error) with what is allowed;
method options (``--option KEY=VALUE``) are checked against the method's adapters'
config fields before any backbone loads.

Example:
    >>> parser = argparse.ArgumentParser(); add_train_arguments(parser)
    >>> args = parser.parse_args(["--backbone", "minilm", "--method", "lora", "--option", "rank=4", ...])
    >>> run = run_spec(args)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from graytune.config import field_docs
from graytune.data.catalog import BUILTIN
from graytune.data.stream import LoaderConfig
from graytune.devices import DTYPES, parse_device
from graytune.errors import InvalidInputError, MissingDependencyError
from graytune.methods import METHODS, get_method
from graytune.recipes.run import RunSpec
from graytune.train.config import LIMITS, TrainConfig, checkpoint_cadence, limit_problem
from graytune.train.zeroth import ZO_FIELDS, settings_problems
from graytune.types import AccessLevel

#: What ``--task`` may name (the data set's own task by default).
TASKS = ["retrieval", "classification", "sketch", "generation", "images"]
#: Built-in sets of texts only (a language model's sets too): image flags do nothing on them.
TEXT_SETS = ("wordnet-supersense", "fortunes", *(name for name, task in BUILTIN.items() if task == "generation"))
#: Flags that set how images are prepared and decoded, by their ``argparse`` names.
IMAGE_FLAGS = {"image_size": "--image-size", "workers": "--workers", "cache_mb": "--cache-mb"}
#: ``--lr``'s help (``TrainConfig.lr``'s doc speaks of None, which is no value to type).
LR_HELP = "peak learning rate of AdamW"
#: Help that says more than ``TrainConfig``'s field docs: the call budget's unit, and each estimator as implemented.
HELP = {
    "max_calls": "stop before a training step would take the forward calls through the boundary past this many, "
                 "counted one per batched forward of one tower (what a server meters; a two-tower loss evaluation "
                 "is 2 calls). ZIP and BlackVIP count one call per model evaluation (both towers): for their budget "
                 "of N give 2N on a two-tower task; graytune reports both counts (train_calls, train_evaluations). "
                 "Validation calls are counted apart; 0: no limit",
    "zo": "zeroth-order estimator, for methods whose input adapters train from forward calls alone (dga-zo, "
          "prompt-zo): spsa (Rademacher, fixed eps), spsa-gc (BlackVIP's gradient correction, the default; "
          "Rademacher directions and a fixed eps where BlackVIP's are segmented-uniform and decaying), zip (ZIP's "
          "low-rank, feature-shared reparametrisation with Fastfood projections, rank 5, its segmented-uniform "
          "directions, eps/t^0.1 and sqrt(n) clipping) or mezo (MeZO's two-point Gaussian); every estimate is "
          "stepped by AdamW with warm-up and cosine, not the papers' SGD gains (graytune methods)",
    "zo_dim": "--zo zip: ZIP's intrinsic dimension k, shared out over the rows of the zeroth-order tensors (one "
              "per token, one per other tensor) (default 500, ZIP's)",
}
#: Methods ``graytune train`` makes (TransMiter itself is made by ``graytune extract`` + ``transfer``).
TRAINABLE = [name for name, m in METHODS.items() if m.made_by.by_train]


def _checked(text: str, kind: type, problem: Any) -> Any:
    """``text`` as ``kind``, or argparse's usage error with ``problem(value)`` when that is not empty."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
    if message := problem(value):
        raise argparse.ArgumentTypeError(message)
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return int(_checked(text, int, lambda v: "" if v >= 1 else f"must be a positive integer; got {v}"))


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return int(_checked(text, int, lambda v: "" if v >= 0 else f"must be >= 0; got {v}"))


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    return float(_checked(text, float, lambda v: "" if v >= 0 else f"must be >= 0; got {v}"))


def _field_type(name: str) -> Any:
    """argparse type for the ``TrainConfig`` field ``name``, with the trainer's own limits."""
    if name == "checkpoint_every":
        def cadence(text: str) -> str:
            try:
                checkpoint_cadence(text)
            except InvalidInputError as err:
                raise argparse.ArgumentTypeError(str(err)) from None
            return text

        return cadence
    if name == "zo":
        def estimator(text: str) -> str:
            if problems := settings_problems(text, None, None):
                raise argparse.ArgumentTypeError(problems[0])
            return text

        return estimator
    kind = float if name in ("lr", "weight_decay", "warmup", "zo_eps", "zo_momentum") else int

    def parse(text: str) -> Any:
        return _checked(text, kind, lambda v: limit_problem(name, v))

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def option_pair(text: str) -> tuple[str, str]:
    """argparse type: ``KEY=VALUE``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE; e.g. --option rank=4 "
                                         "(graytune methods lists each method's options)")
    return key.strip(), value.strip()


def add_data_arguments(p: argparse.ArgumentParser, required: bool = False) -> None:
    """``--data``, ``--workers`` and ``--cache-mb`` (shared with ``graytune eval``)."""
    p.add_argument("--data", required=required, default=None,
                   help="tuxpaint, emoji, tuxpaint-sketch, fashion-mnist, wordnet-supersense, fortunes (add "
                        ":base-to-novel to a classification set), or a path: .csv/.jsonl of image,caption, "
                        "image,label or text,label rows (optional split column), a COCO or Karpathy caption .json, WebDataset .tar "
                        "shards (brace patterns), a folder of class folders, or (diffusion models) a folder of images "
                        "of one concept with optional <image>.txt captions")
    defaults = LoaderConfig()
    p.add_argument("--workers", type=non_negative_int, default=None,
                   help=f"processes decoding images on the fly (default: {defaults.workers}, in this process)")
    p.add_argument("--cache-mb", type=non_negative_float, default=None,
                   help="preprocessed images kept in memory between epochs, at most this many MB "
                        f"(default: {defaults.cache_mb:g})")


def loader_config(args: argparse.Namespace) -> LoaderConfig:
    """``--workers`` and ``--cache-mb`` as given, ``LoaderConfig``'s defaults for the rest."""
    given = {k: getattr(args, k) for k in ("workers", "cache_mb") if getattr(args, k) is not None}
    return LoaderConfig(**given)


def add_placement_arguments(p: argparse.ArgumentParser, recompute: bool = True) -> None:
    """``--device``, ``--dtype`` (and ``--recompute``): where the client and an in-process backbone run."""
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="cpu, cuda or cuda:N: where the adapters run, and an in-process backbone with them "
                        "(default: CUDA when present, else CPU)")
    p.add_argument("--dtype", default=None, choices=sorted(set(DTYPES)), metavar="DTYPE",
                   help="precision of an in-process backbone: fp32 (default), bf16 or fp16; adapters stay fp32 "
                        "(a served backbone's precision is its owner's: graytune serve --dtype)")
    if not recompute:  # forward-only commands keep no activations to recompute
        return
    p.add_argument("--recompute", action="store_true",
                   help="an in-process backbone keeps only layer inputs and recomputes the layers in the backward: "
                        "exact, less memory, about one more forward of time (a server's owner sets it with "
                        "graytune serve --recompute)")


def placement(args: argparse.Namespace) -> dict[str, Any]:
    """``device``/``dtype``/``recompute`` from the flags, checked now; a served backbone's are its owner's.

    Raises:
        InvalidInputError: an unknown or absent device, or --dtype/--recompute with an http:// backbone.
    """
    parse_device(args.device)  # an absent CUDA device is said before anything loads
    if args.backbone.startswith(("http://", "https://")):
        recompute = getattr(args, "recompute", False)
        owner = [flag for flag, value in (("--dtype", args.dtype), ("--recompute", recompute)) if value]
        if owner:
            raise InvalidInputError(f"{' and '.join(owner)} set how the owner runs the backbone, and "
                                    f"{args.backbone} runs on its owner's server: they choose with graytune serve "
                                    "--dtype/--recompute; --device here places your adapters")
    return {"device": args.device, "dtype": args.dtype, "recompute": bool(getattr(args, "recompute", False))}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Every flag of a training run (see ``run_spec``)."""
    p.add_argument("--backbone", required=True,
                   help="backbone id, e.g. bridge:efficientnet-lite0+minilm, or http://HOST:PORT of a graytune "
                        "serve (key in $GRAYTUNE_API_KEY)")
    p.add_argument("--access", default=None, choices=[lvl.label for lvl in AccessLevel],
                   help="level to open the backbone at (default: the method's own, the least exposure)")
    p.add_argument("--method", required=True, choices=TRAINABLE, metavar="METHOD",
                   help="one of " + ", ".join(TRAINABLE) + " (graytune methods describes each)")
    p.add_argument("--option", action="append", type=option_pair, default=[], metavar="KEY=VALUE",
                   help="a method option, repeatable: e.g. --option rank=4 --option alpha=8 (lora), "
                        "--option layers=2,4 (lga); graytune methods lists them with types and defaults")
    p.add_argument("--adapter", default=None,
                   help="an artifact to start from: for transmiter+, the folder written by graytune transfer; "
                        "for any other method, an artifact of that method on the same backbone (warm start)")
    p.add_argument("--shots", type=positive_int, default=None,
                   help="transmiter+ only: labelled images or texts per class (default: 16)")
    p.add_argument("--task", choices=TASKS, help="default: the data set's own")
    add_data_arguments(p)
    p.add_argument("--train", default=None, metavar="FILE", help="the training split as its own file or folder "
                   "(instead of --data; same formats)")
    p.add_argument("--val", default=None, metavar="FILE", help="with --train: the validation split (default: "
                   "10 %% of --train, said in the output)")
    p.add_argument("--test", default=None, metavar="FILE", help="with --train: the test split (default: none)")
    p.add_argument("--out", required=True, help="folder for the adapter (a checkpoint there resumes the run)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="image side in pixels (default: the spec's)")
    p.add_argument("--template", action="append", default=[], metavar="TEXT",
                   help="a diffusion model only: a prompt template, {} where each image's caption goes, e.g. "
                        "'a painting in the style of {}' (the adapter's token comes before the end); repeatable: "
                        "each row draws one per step, validation and test use the first (default: 'a picture of {}')")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    docs = {**field_docs(TrainConfig), "lr": LR_HELP}
    for f in fields(TrainConfig):
        default = "the method's, graytune methods lists it" if f.name == "lr" else f.default
        shown = "" if f.name in ZO_FIELDS else f" (default: {default})"  # their docs say the estimator's defaults
        p.add_argument("--" + f.name.replace("_", "-"), type=_field_type(f.name), default=None,
                       help=f"{HELP.get(f.name, docs.get(f.name, ''))}{shown}")
    add_placement_arguments(p)
    p.add_argument("--retry-s", type=non_negative_float, default=None,
                   help="with an http:// backbone: keep retrying a server that is down or restarting for this "
                        "many seconds (default: 120)")
    p.add_argument("--log", choices=["jsonl", "tensorboard"], default="jsonl",
                   help="history.jsonl is always written in --out; tensorboard also writes TensorBoard events "
                        "there (pip install 'graytune[tensorboard]')")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished adapter in --out, or write beside files that are not a graytune run "
                        "(graytune never deletes those)")


def given_train_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainConfig`` fields set on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}


def run_spec(args: argparse.Namespace) -> RunSpec:
    """The run the flags describe; method options checked now, before any backbone loads.

    Raises:
        InvalidInputError: an option the method does not have, or a flag that means nothing for this method.
    """
    method = get_method(args.method)
    options = dict(args.option)
    if args.shots is not None and not method.made_by.takes_shots:
        raise InvalidInputError(f"--shots is for --method transmiter+; --method {args.method} trains on the whole "
                                "training split")
    resolved = method.resolve_options(options)  # every bad option reported now, with the allowed ones
    zo_flags = [f"--{name.replace('_', '-')}" for name in ZO_FIELDS if getattr(args, name) is not None]
    if zo_flags and not any(o.get("zeroth_order") for o in resolved.values()):
        raise InvalidInputError(f"{', '.join(zo_flags)} set zeroth-order training; --method {args.method} trains "
                                "no adapter zeroth-order: use --method dga-zo or prompt-zo (graytune methods marks "
                                "them), or drop those flags")
    if args.max_calls is not None and not method.slots:
        raise InvalidInputError(f"--max-calls caps training calls; --method {args.method} trains nothing")
    if args.log == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise MissingDependencyError("--log tensorboard needs the tensorboard package: "
                                         "pip install 'graytune[tensorboard]'")
    config = TrainConfig(**given_train_fields(args))
    if args.retry_s is not None and not args.backbone.startswith(("http://", "https://")):
        raise InvalidInputError(f"--retry-s is for a served backbone (http://HOST:PORT); {args.backbone!r} runs in "
                                "this process")
    files = {"train": args.train, "val": args.val, "test": args.test}
    given = [f"--{k} {v}" for k, v in files.items() if v]
    if args.data is not None and given:
        raise InvalidInputError(f"--data {args.data} and {', '.join(given)} both name the data; give --data "
                                "(its own splits, or a 70/10/20 re-split) or --train FILE [--val FILE] [--test FILE], "
                                "not both")
    refuse_image_flags(args, args.data or args.train)
    return RunSpec(args.backbone, args.access, args.method, args.data, args.task, args.out, args.image_size,
                   config, options, args.adapter, files=files, loader=loader_config(args),
                   retry_s=args.retry_s, tensorboard=args.log == "tensorboard", overwrite=args.overwrite,
                   templates=tuple(args.template), **placement(args))


def text_data(source: str | None) -> bool:
    """Whether ``source`` (a ``--data`` or ``--train`` value) holds texts only: a built-in text set, a JSONL of
    prompts and completions (its first row has ``prompt`` or ``messages``), or a CSV/JSONL of ``text,label`` rows."""
    if not source:
        return False
    name = source.removesuffix(":base-to-novel")
    if name in BUILTIN:
        return name in TEXT_SETS
    path = Path(name)
    if path.suffix.lower() not in (".jsonl", ".csv") or not path.is_file():
        return False
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        first = next((line for line in fh if line.strip()), "")
    if path.suffix.lower() == ".csv":
        header = {field.strip().lower() for field in first.split(",")}
        return "text" in header and "image" not in header
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return False  # the reader names the bad line
    return isinstance(row, dict) and ("prompt" in row or "messages" in row or ("text" in row and "image" not in row))


def refuse_image_flags(args: argparse.Namespace, source: str | None) -> None:
    """Refuse ``--image-size``, ``--workers`` and ``--cache-mb`` on data of texts only, where they would do nothing.

    Raises:
        InvalidInputError: one of them is given and ``source`` holds texts only.
    """
    given = [flag for name, flag in IMAGE_FLAGS.items() if getattr(args, name, None) is not None]
    if given and text_data(source):
        them = "it" if len(given) == 1 else "them"
        raise InvalidInputError(f"{', '.join(given)} set how images are prepared and decoded; {source} holds texts "
                                f"only, so {them} would do nothing: drop {them}")


__all__ = ["LIMITS", "TASKS", "TEXT_SETS", "TRAINABLE", "add_placement_arguments", "add_train_arguments", "placement",
           "given_train_fields", "non_negative_float", "non_negative_int", "option_pair", "positive_int",
           "refuse_image_flags", "run_spec", "text_data"]
