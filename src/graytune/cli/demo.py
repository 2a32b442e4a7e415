"""``graytune demo``: the main job on the embedded default, a results table in minutes.

Opens ``bridge:efficientnet-lite0+minilm`` at dark-gray behind the in-process
boundary and prints zero-shot retrieval on the 785 Tux Paint captions.
"""

from __future__ import annotations

import argparse
import time

from graytune.access import open_backbone
from graytune.data.images import ImagePreprocess
from graytune.data.tuxpaint import load_tuxpaint
from graytune.eval.embed import embed_images, embed_texts
from graytune.eval.retrieval import retrieval_metrics

BACKBONE = "bridge:efficientnet-lite0+minilm"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="zero-shot Tux Paint retrieval on the packaged bridge backbone")
    p.add_argument("--backbone", default=BACKBONE, help=f"an image–text backbone (default: {BACKBONE})")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the spec's)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N pairs (default: all)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    handle = open_backbone(args.backbone, access="dark-gray")
    data = load_tuxpaint()
    if args.limit:
        data = data.subset(list(range(min(args.limit, len(data)))))
    pre = ImagePreprocess.from_spec(handle.spec, args.image_size, fit="pad")  # drawings: keep the outline
    images = embed_images(handle, data.images, pre)
    texts = embed_texts(handle, data.captions)
    m = retrieval_metrics(images, texts, data.caption_image)
    print(f"\nZero-shot retrieval, Tux Paint stamps ({len(data)} drawings, {len(data.captions)} captions), "
          f"{handle.spec.id} at {handle.access.label}, {pre.image_size} px, padded on white")
    print("(a composite bridge of two real models, not contrastively trained)\n")
    print(f"{'direction':<16}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'median rank':>14}")
    for label, key in (("image → text", "text_retrieval"), ("text → image", "image_retrieval")):
        print(f"{label:<16}" + "".join(f"{m[f'{key}_recall@{k}']:>8.1f}" for k in (1, 5, 10))
              + f"{m[f'{key}_median_rank']:>14.0f}")
    chance = 100.0 / len(data)
    print(f"\nchance R@1 {chance:.2f}; mean recall {m['mean_recall']:.1f}; "
          f"{handle.exposure.forward_samples} samples sent, {handle.exposure.gradient_queries} gradient queries; "
          f"{time.perf_counter() - start:.0f} s")
    return 0
