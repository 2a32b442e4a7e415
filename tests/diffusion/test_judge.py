"""A diffusion model judged by a dual encoder (``graytune.eval.judge``): CLIP-T and CLIP-I equal plain torch cosines
of the judge's embeddings of the same generated images (drawn again with ``model.generate_images``), are the same on
every call and lie in [-1, 1]; ``graytune eval --judge`` prints them; a judge on a backbone that draws nothing, a
judge without both towers and judge flags without a judge are refused. Mechanics only: on random weights (arch:sd-tiny,
a tiny random CLIP) the scores say nothing about image quality."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import graytune
from graytune.access.images import ImageSettings
from graytune.artifacts import load_adapter
from graytune.cli.main import main
from graytune.data.catalog import load_splits
from graytune.data.images import ImagePreprocess
from graytune.errors import InvalidInputError
from graytune.eval.judge import evaluate_generated
from graytune.eval.scale import as_percent, is_fraction
from graytune.model import AdaptedModel
from graytune.recipes.evaluate import open_judge
from graytune.recipes.run import make_task, open_for

SETTINGS = ImageSettings(num_inference_steps=2, seed=11, height=32, width=32)
WORDS = ["on a red sofa", "in the snow", "at the beach", "under a tree", "by the sea", "on a table", "in a box",
         "on the grass", "near a door", "in the rain"]


@pytest.fixture(scope="module")
def concept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten small captioned images of one 'concept' (random colours)."""
    root = tmp_path_factory.mktemp("judge-concept")
    for i, words in enumerate(WORDS):
        g = torch.Generator().manual_seed(i)
        Image.fromarray((torch.rand(24, 20, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(words, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def judge(tiny_clip_dir: Path) -> Any:
    return graytune.open_backbone(f"hf-clip:{tiny_clip_dir}", access="black-box")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DGA adapter whose tensors are not the identity (so its edits show in the images), saved."""
    model = AdaptedModel.build(open_for("arch:sd-tiny", None, "dga"), "dga")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.text_adapters.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("judge-dga") / "dga"
    model.save_pretrained(folder)
    return folder


def _scored(concept: Path, adapter: Path, whole: bool = False) -> tuple[Any, Any, list[str]]:
    """The adapter reloaded, and the test split (``whole``: the folder, as ``graytune eval`` scores a folder without
    splits) with its prompts as ``graytune eval`` makes them."""
    splits = load_splits(str(concept), whole_if_unsplit=whole)
    model = load_adapter(adapter, open_for("arch:sd-tiny", None, "dga"))
    task = make_task(splits, model.handle, 32)
    return model, splits.test, task.prompts(splits.test)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a / a.norm(dim=-1, keepdim=True) * (b / b.norm(dim=-1, keepdim=True))).sum(-1)


def _reference(model: Any, data: Any, prompts: list[str], judge: Any, n: int) -> dict[str, float]:
    """The scores computed directly: images drawn one by one (seed + i), saved-as-8-bit, the judge's own
    preprocessing, its ``image.embeds``/``text.embeds`` forward, plain cosines."""
    pre = ImagePreprocess.from_spec(judge.spec)
    drawn = [model.generate_images([prompts[i]], ImageSettings(2, seed=11 + i, height=32, width=32))[0]
             for i in range(n)]
    pil = [Image.fromarray((d.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for d in drawn]
    fake = judge.forward({"image.pixels": pre(pil)}, outputs=["image.embeds"])["image.embeds"]
    real = judge.forward({"image.pixels": pre([Image.open(p) for p in data.images[:n]])},
                         outputs=["image.embeds"])["image.embeds"]
    text = judge.forward({"text": prompts[:n]}, outputs=["text.embeds"])["text.embeds"]
    return {"clip_t": float(_cosine(fake, text).mean()), "clip_i": float(_cosine(fake, real).mean())}


def test_scores_equal_a_direct_computation_and_repeat(concept: Path, adapter: Path, judge: Any) -> None:
    model, data, prompts = _scored(concept, adapter)
    assert len(data) >= 2 and all(p for p in prompts)  # captioned prompts, one per held-out image
    scores = evaluate_generated(model, data, prompts, judge, SETTINGS, max_images=2, batch_size=1)
    assert scores["judge"] == judge.spec.id and scores["judged_images"] == 2
    assert scores["settings"]["num_inference_steps"] == 2 and scores["settings"]["seed"] == 11
    want = _reference(model, data, prompts, judge, 2)
    assert scores["clip_t"] == pytest.approx(want["clip_t"], abs=1e-5)
    assert scores["clip_i"] == pytest.approx(want["clip_i"], abs=1e-5)
    assert evaluate_generated(model, data, prompts, judge, SETTINGS, max_images=2, batch_size=1) == scores  # again
    batched = evaluate_generated(model, data, prompts, judge, SETTINGS, max_images=2)  # judge calls of 2: float noise
    assert batched["clip_t"] == pytest.approx(scores["clip_t"], abs=1e-5)
    assert batched["clip_i"] == pytest.approx(scores["clip_i"], abs=1e-5)
    assert all(-1 <= scores[k] <= 1 for k in ("clip_t", "clip_i"))
    assert judge.exposure.gradient_queries == 0  # the judge is used through its outputs only


def test_the_count_is_bounded_and_image_i_does_not_depend_on_it(concept: Path, adapter: Path, judge: Any) -> None:
    model, data, prompts = _scored(concept, adapter)
    one = evaluate_generated(model, data, prompts, judge, SETTINGS, max_images=1)
    many = evaluate_generated(model, data, prompts, judge, SETTINGS, max_images=100)
    assert one["judged_images"] == 1 and many["judged_images"] == len(data)
    assert one["clip_t"] == pytest.approx(_reference(model, data, prompts, judge, 1)["clip_t"], abs=1e-5)
    with pytest.raises(InvalidInputError, match="1 prompts for .* held-out images; give one prompt per image"):
        evaluate_generated(model, data, prompts[:1], judge, SETTINGS)


def test_cosines_are_not_fractions() -> None:
    assert not is_fraction("clip_t") and not is_fraction("clip_i")
    assert as_percent({"clip_t": 0.25, "clip_i": -0.5}) == {"clip_t": 0.25, "clip_i": -0.5}


def test_graytune_eval_judge_prints_the_scores(concept: Path, adapter: Path, judge: Any, tiny_clip_dir: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    flags = ["eval", "--backbone", "arch:sd-tiny", "--adapter", str(adapter), "--data", str(concept), "--image-size",
             "32", "--judge", f"hf-clip:{tiny_clip_dir}", "--judge-images", "2", "--steps", "2"]
    assert main([*flags, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["judge"] == f"hf-clip:{tiny_clip_dir}" and result["judged_images"] == 2
    assert result["judge_settings"]["height"] == 32 and result["judge_settings"]["num_inference_steps"] == 2
    assert set(result["test"]) == {"denoise_score", "denoise_mse", "clip_t", "clip_i"}
    assert result["split"] == "all" and result["items"] == len(WORDS)  # a folder without splits is scored whole
    model, data, prompts = _scored(concept, adapter, whole=True)
    want = evaluate_generated(model, data, prompts, judge, ImageSettings(2, height=32, width=32), max_images=2)
    assert result["test"]["clip_t"] == pytest.approx(want["clip_t"], abs=1e-6)
    assert result["test"]["clip_i"] == pytest.approx(want["clip_i"], abs=1e-6)
    assert main(flags) == 0
    printed = capsys.readouterr().out
    assert "clip_t, clip_i: mean cosines by hf-clip:" in printed and "of 2 generated images (2 steps each)" in printed
    assert "clip_t %" not in printed and "clip_t" in printed


def test_refusals(concept: Path, tiny_clip_dir: Path, capsys: pytest.CaptureFixture) -> None:
    encoder = graytune.open_backbone("minilm", access="black-box")
    with pytest.raises(InvalidInputError, match="a judge .--judge. scores generated images, and minilm generates "
                                                "none: .*give a diffusion backbone .arch:sd-tiny, hf-diffusion:DIR."):
        open_judge(encoder, f"hf-clip:{tiny_clip_dir}")
    diffusion = graytune.open_backbone("arch:sd-tiny", access="black-box")
    with pytest.raises(InvalidInputError, match=r"judge minilm lacks image.embeds \(it publishes \['text.embeds'\]\)"
                                                ": .* needs both image.embeds and text.embeds"):
        open_judge(diffusion, "minilm")
    with pytest.raises(InvalidInputError, match="judge efficientnet-lite0 lacks text.embeds"):
        open_judge(diffusion, "efficientnet-lite0")
    assert main(["eval", "--backbone", "arch:sd-tiny", "--data", str(concept), "--steps", "2"]) == 2
    assert "--steps set how a judge scores generated images; give --judge" in capsys.readouterr().err
    assert main(["eval", "--backbone", "minilm", "--data", "fortunes:base-to-novel", "--judge",
                 f"hf-clip:{tiny_clip_dir}"]) == 2
    assert "minilm generates none: it is no text-to-image diffusion model" in capsys.readouterr().err
