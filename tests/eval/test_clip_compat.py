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


def test_the_transform_uses_the_artifacts_image_size_and_fit(tmp_path) -> None:
    """A DGA adapter trained at 64 px on padded drawings is handed to evaluators at 64 px, padded (not at the
    spec's 224 px, cropped); its config is there to read, and reading it changes nothing."""
    handle = open_for("bridge:efficientnet-lite0+minilm", "dark-gray", "dga")
    trained = AdaptedModel.build(handle, "dga")
    assert trained.config["method"] == "dga" and "image_size" not in trained.config  # not saved: itself only
    recorded = {"image_size": 64, "preprocess": {"image_size": 64, "fit": "pad"}, "classes": None}
    trained.save_pretrained(tmp_path / "dga", extra=recorded)
    assert trained.config["image_size"] == 64  # the artifact it was just saved to
    model = AdaptedModel.from_pretrained(tmp_path / "dga", handle)
    assert model.config["image_size"] == 64 and model.config["backbone"] == handle.spec.id
    with pytest.raises(TypeError):
        model.config["image_size"] = 224  # type: ignore[index]
    model.config["preprocess"]["fit"] = "crop"  # a copy: the model's config keeps "pad"
    assert model.config["preprocess"]["fit"] == "pad"

    _, transform, _ = for_clip_evaluators(model)
    wide = Image.new("RGB", (80, 40), "black")
    pixels = transform(wide)
    assert pixels.shape == (3, 64, 64)
    assert not torch.allclose(pixels[:, 0], pixels[:, 32])  # padded on white above the black drawing, not cropped
    assert for_clip_evaluators(model, image_size=96)[1](wide).shape == (3, 96, 96)  # an explicit size wins
