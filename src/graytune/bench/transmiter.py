"""TransMiter's costs: transfer wall time, and adapted inference against zero-shot, side by side.

Weak ``bridge:efficientnet-lite0+minilm``, strong ``bridge:efficientnet-lite1+minilm`` at black-box,
Fashion-MNIST images at 64 px, M = D = 1024 classes (the authors' defaults).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from graytune.access import open_backbone
from graytune.data.images import ImagePreprocess, pixel_cache
from graytune.data.labeled import FASHION_CLASSES, load_fashion_mnist
from graytune.transfer.transmiter import TransMiter, class_scores, class_text


def run(unlabeled: int = 1000, test: int = 512, rounds: int = 5, size: int = 64) -> dict[str, Any]:
    weak = open_backbone("bridge:efficientnet-lite0+minilm", access="black-box")
    strong = open_backbone("bridge:efficientnet-lite1+minilm", access="black-box")
    data = load_fashion_mnist("test")
    pre = ImagePreprocess.from_spec(weak.spec, size)
    pool = pixel_cache([data.pil(i) for i in range(unlabeled)], pre)
    probe = pixel_cache([data.pil(i) for i in range(unlabeled, unlabeled + test)], pre)
    tm = TransMiter.create(list(FASHION_CLASSES), total=1024, seed=0)
    with torch.no_grad():
        for p in tm.adapter.mlp.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a non-trivial adapter
    weak_scores = tm.scores(weak, pool)
    start = time.perf_counter()
    strong_scores = tm.scores(strong, pool)
    scoring = time.perf_counter() - start
    start = time.perf_counter()
    moved = tm.transfer(weak_scores, strong_scores)
    solve = time.perf_counter() - start
    names = list(FASHION_CLASSES)
    zs_text = class_text(strong, names, tm.prompt)  # both paths embed their class prompts once, up front
    moved.scores(strong, probe[:1])
    zs, adapted = [], []
    for r in range(rounds):  # interleaved, alternating who goes first
        for which in ((0, 1) if r % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            if which == 0:
                class_scores(strong, probe, names, tm.prompt, text=zs_text)
                zs.append(time.perf_counter() - start)
            else:
                moved.predict(strong, probe)
                adapted.append(time.perf_counter() - start)
    return {"unlabeled": unlabeled, "transfer_scoring_s": scoring, "transfer_solve_s": solve,
            "zero_shot_s": statistics.median(zs), "adapted_s": statistics.median(adapted),
            "inference_ratio": statistics.median(adapted) / statistics.median(zs), "test_images": test,
            "classes": 1024}


def format_report(r: dict[str, Any]) -> str:
    return (f"TransMiter (M = D = {r['classes']}): transfer on {r['unlabeled']} unlabeled images = "
            f"{r['transfer_scoring_s']:.1f} s scoring them on the strong backbone + {r['transfer_solve_s']:.2f} s "
            f"for the basis change; inference on {r['test_images']} images: zero-shot {r['zero_shot_s']:.2f} s, "
            f"adapted {r['adapted_s']:.2f} s, ratio {r['inference_ratio']:.3f} (class-prompt embeddings computed once "
            "for both; the adapted path scores all 1024 classes and runs the adapter)")
