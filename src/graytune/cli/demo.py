"""``graytune demo``: the main job on the embedded default, a results table in minutes.

On ``bridge:efficientnet-lite0+minilm`` and the Tux Paint captions it trains
zero-shot, output-only (black-box), DGA, LGA, AdaLink (+ output adapters), LoRA and full
fine-tuning with equal step budgets and prints one table. ``--zero-shot``
prints only the zero-shot retrieval on all 785 pairs at the spec's size. Run with the README's
settings, it ends by saying whether its table matches the README's (``compare_with_readme``).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from graytune.access import open_backbone
from graytune.recipes.arguments import non_negative_int, positive_int
from graytune.data.images import ImagePreprocess
from graytune.data.tuxpaint import load_tuxpaint
from graytune.eval.embed import embed_images, embed_texts
from graytune.eval.retrieval import retrieval_metrics
from graytune.eval.scale import as_percent
from graytune.methods import methods_shown_in

BACKBONE = "bridge:efficientnet-lite0+minilm"
#: One method per rung of the ladder that ``graytune train`` makes (the registry has more: graytune methods).
METHODS = tuple(methods_shown_in("demo"))  # the README table's rows
#: The README section whose table the demo prints; the columns compared (step time and memory are the machine's).
README_SECTION = "## What `make demo` does"
COMPARED = ("method", "access", "i→t R@1", "t→i R@1", "mean R", "params")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="compare adaptation methods on Tux Paint retrieval through the bridge backbone",
                       description="Train each method of the ladder (zero-shot to full fine-tuning) with the same "
                                   "step budget on Tux Paint drawing-caption retrieval through the packaged bridge "
                                   "backbone, and print one table: test R@1 both ways, mean recall, trainable "
                                   "parameters, access level, step time and peak memory. With the default settings "
                                   "it ends by saying whether its table matches README.md's.")
    p.add_argument("--backbone", default=BACKBONE, help=f"an image–text backbone (default: {BACKBONE})")
    p.add_argument("--methods", default=",".join(METHODS), type=_method_list,
                   help=f"comma-separated methods (default: {','.join(METHODS)}; graytune methods lists them)")
    p.add_argument("--steps", type=positive_int, default=40, help="training steps per method (default: 40)")
    p.add_argument("--image-size", type=positive_int, default=128, help="image side in pixels (default: 128)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the splits' order, the adapters' "
                                                                     "initial weights and the batches (default: 0)")
    p.add_argument("--zero-shot", action="store_true", help="only zero-shot retrieval on all 785 pairs")
    p.add_argument("--limit", type=positive_int, default=None, help="with --zero-shot: the first N pairs only")
    p.set_defaults(run=run)


def _method_list(text: str) -> list[str]:
    from graytune.methods import get_method

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one method, e.g. --methods zero-shot,dga")
    for name in names:
        try:
            get_method(name)
        except KeyError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return names


def run(args: argparse.Namespace) -> int:
    return zero_shot(args) if args.zero_shot else comparison(args)


def comparison(args: argparse.Namespace) -> int:
    from graytune.recipes.compare import compare

    start = time.perf_counter()
    rows = compare(args.backbone, "tuxpaint", args.methods, args.steps, args.seed, args.image_size)
    print(f"\nTux Paint image↔caption retrieval, {args.backbone}, {args.image_size} px, {args.steps} steps of "
          f"batch 32 per method, seed {args.seed}; test split of 200 drawings (train 500, val 85)")
    print("(the bridge composes two real models and is not contrastively trained)\n")
    table = table_lines(rows)
    print("\n".join(table))
    print("\ni→t: image→text (text_retrieval_recall@1); t→i: text→image; mean R: mean of R@1/5/10 both ways (%).")
    print("step s: median training-step time; peak MB: peak tensor memory of one step beyond the resident weights.")
    print(f"{time.perf_counter() - start:.0f} s in all")
    defaults = (BACKBONE, list(METHODS), 40, 128, 0)
    if (args.backbone, list(args.methods), args.steps, args.image_size, args.seed) == defaults:
        print(compare_with_readme(table, _readme_text()))
    else:
        print("not the README's settings (default backbone, methods, steps, image size and seed): its table is not "
              "compared")
    return 0


def table_lines(rows: list[dict]) -> list[str]:
    """The printed table: a header, a rule, one line per method."""
    head = (f"{'method':<15}{'access':<12}{'i→t R@1':>8}{'t→i R@1':>8}{'mean R':>8}{'params':>11}"
            f"{'step s':>8}{'peak MB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        t = as_percent(r["test"])
        lines.append(f"{r['method']:<15}{r['access']:<12}{t['text_retrieval_recall@1']:>8.1f}"
                     f"{t['image_retrieval_recall@1']:>8.1f}{t['mean_recall']:>8.1f}{r['trainable_parameters']:>11,}"
                     f"{r['step_seconds']:>8.2f}{r['peak_mb']:>9.0f}")
    return lines


def readme_table(readme: str) -> list[str] | None:
    """The table lines of the README's demo section (its first fenced block), or None when it has none."""
    section = readme.partition(README_SECTION)[2]
    block = re.search(r"```[^\n]*\n(.*?)```", section, flags=re.S)
    return block.group(1).rstrip("\n").split("\n") if block else None


def compare_with_readme(table: list[str], readme: str | None) -> str:
    """A line saying whether ``table`` matches the README's in the columns that do not depend on the machine
    (``COMPARED``), naming each cell that differs.

    Example:
        >>> compare_with_readme(table_lines(rows), Path("README.md").read_text())
        "README.md's table differs in 1 cell: dga mean R 36.9 here, 37.2 in README.md ..."
    """
    theirs = readme_table(readme) if readme is not None else None
    if theirs is None:
        return f"README.md (section {README_SECTION!r}) was not found: the table is not compared"
    ours_rows, their_rows = _cells(table), _cells(theirs)
    differences = [f"{method} {column} {ours[i]} here, {their_rows[method][i]} in README.md"
                   for method, ours in ours_rows.items() if method in their_rows
                   for i, column in enumerate(COMPARED) if ours[i] != their_rows[method][i]]
    differences += [f"{m} printed here, not in README.md" for m in ours_rows if m not in their_rows]
    differences += [f"{m} in README.md, not printed here" for m in their_rows if m not in ours_rows]
    if not differences:
        return (f"README.md's table matches this one ({', '.join(COMPARED)}; step s and peak MB depend on the "
                "machine)")
    return (f"README.md's table differs in {len(differences)} cell{'s' * (len(differences) > 1)}: "
            + "; ".join(differences) + " (step s and peak MB, which depend on the machine, not compared)")


def _cells(lines: list[str]) -> dict[str, list[str]]:
    """Per method, its row's cells (the header and rule skipped)."""
    rows = [line.split() for line in lines if line.strip() and not line.startswith(("method", "-"))]
    return {cells[0]: cells for cells in rows}


def _readme_text() -> str | None:
    """README.md of the source tree graytune runs from, else the one installed as its package description."""
    source = Path(__file__).resolve().parents[3] / "README.md"
    if source.is_file():
        return source.read_text(encoding="utf-8")
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        return metadata("graytune").get("Description")
    except PackageNotFoundError:
        return None


def zero_shot(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    handle = open_backbone(args.backbone, access="black-box")
    data = load_tuxpaint()
    if args.limit:
        data = data.subset(list(range(min(args.limit, len(data)))))
    pre = ImagePreprocess.from_spec(handle.spec, fit="pad")  # drawings: keep the whole outline
    images = embed_images(handle, data.images, pre)
    texts = embed_texts(handle, data.captions)
    m = as_percent(retrieval_metrics(images, texts, data.caption_image))
    print(f"\nZero-shot retrieval, Tux Paint stamps ({len(data)} drawings, {len(data.captions)} captions), "
          f"{handle.spec.id} at {handle.access.label}, {pre.image_size} px, padded on white")
    print("(a composite bridge of two real models, not contrastively trained)\n")
    print(f"{'direction':<16}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'median rank':>14}")
    for label, key in (("image → text", "text_retrieval"), ("text → image", "image_retrieval")):
        print(f"{label:<16}" + "".join(f"{m[f'{key}_recall@{k}']:>8.1f}" for k in (1, 5, 10))
              + f"{m[f'{key}_median_rank']:>14.0f}")
    print(f"\nchance R@1 {100.0 / len(data):.2f}; mean recall {m['mean_recall']:.1f}; "
          f"{handle.exposure.forward_samples} samples sent; {time.perf_counter() - start:.0f} s")
    return 0
