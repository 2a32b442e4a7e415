"""CLIP_benchmark's own retrieval evaluation runs unchanged on an adapted model and agrees with ours."""

from __future__ import annotations

import pytest
import torch
from clip_benchmark.metrics import zeroshot_retrieval  # installed by scripts/setup.sh (--no-deps)
from PIL import Image

from graytune.eval.clip_compat import for_clip_evaluators
from graytune.eval.retrieval import retrieval_metrics
from graytune.model import AdaptedModel
from graytune.recipes.run import open_for


def test_clip_benchmark_retrieval_runs_on_an_adapted_model(tiny_clip_dir) -> None:
    handle = open_for(f"hf-clip:{tiny_clip_dir}", "dark-gray", "dga")
    adapted = AdaptedModel.build(handle, "dga")
    with torch.no_grad():
        for p in adapted.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model, transform, tokenizer = for_clip_evaluators(adapted)
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(20, 24, 3, generator=g) * 255).byte().numpy()) for _ in range(6)]
    captions = [["a cat", "a small cat"], ["dogs run"], ["a red car", "red car"], ["rain"], ["a tree"], ["sea"]]
    dataset = list(zip([transform(im) for im in images], captions))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4,
                                         collate_fn=lambda b: (torch.stack([x for x, _ in b]), [t for _, t in b]))
    theirs = zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 2, 3])

    with torch.no_grad():
        img = adapted.encode_image(torch.stack([x for x, _ in dataset]))
        flat = [c for caps in captions for c in caps]
        txt = adapted.encode_text(flat)
    index = [i for i, caps in enumerate(captions) for _ in caps]
    ours = retrieval_metrics(img, txt, index, ks=(1, 2, 3))
    for k in (1, 2, 3):
        for key in (f"image_retrieval_recall@{k}", f"text_retrieval_recall@{k}"):
            assert theirs[key] == pytest.approx(ours[key], abs=1e-6), key  # the same 0–1 scale
