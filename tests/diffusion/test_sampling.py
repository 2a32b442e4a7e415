"""The owner's image sampling equals diffusers' own StableDiffusionPipeline built from the same parts, edits and all;
bad requests are refused before any work; black-box may sample and the exposure record counts it; the CLI draws a
captioned grid."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

import graytune
from graytune.access.images import generate_images
from graytune.adapters.base import TowerRequest
from graytune.backbones.diffusion import HFDiffusion
from graytune.backbones.diffusion_tiny import WIDTH
from graytune.cli.main import main
from graytune.errors import InvalidInputError
from graytune.recipes.image_grid import CAPTION_PX, grid_size
from tests.diffusion.conftest import make_pipeline
from tests.diffusion.reference import hooked

PROMPTS = ["a red circle", "a cat on a mat"]
SMALL = {"num_inference_steps": 3, "seed": 7, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def pipeline(tiny_parts: dict[str, Any]) -> Any:
    pipe = make_pipeline(tiny_parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def handle() -> Any:
    return graytune.open_backbone("arch:sd-tiny", access="light-gray")


def _edits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return 0.5 * torch.randn(1, 1, WIDTH, generator=g), torch.randn(1, 2, WIDTH, generator=g)


def _embeds(parts: dict[str, Any], tokens: dict[str, torch.Tensor], shift: torch.Tensor | None = None,
            inserted: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, L, D]`` the text encoder's states with a shift added at real tokens, or tokens put before each end token
    (the last padding columns drop off), by hooks on the untouched lookup (tests/diffusion/reference.py's way)."""
    ids, mask, encoder = tokens["text.input_ids"], tokens["text.attention_mask"], parts["text_encoder"]
    if shift is not None:
        def edit(_m: Any, _i: Any, out: torch.Tensor) -> torch.Tensor:
            return out + shift * mask.unsqueeze(-1)
    elif inserted is not None:
        k, end = inserted.shape[1], encoder.config.eos_token_id
        ends = [int((row == end).nonzero()[0]) for row in ids]
        ids = torch.stack([torch.cat([row[:e], torch.zeros(k, dtype=ids.dtype), row[e:]])[:ids.shape[1]]
                           for row, e in zip(ids, ends)])

        def edit(_m: Any, _i: Any, out: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.cat([row[:e], inserted[0], row[e + k:]]) for row, e in zip(out, ends)])
    else:
        def edit(_m: Any, _i: Any, out: torch.Tensor) -> torch.Tensor:
            return out
    with torch.no_grad(), hooked(encoder.embeddings.token_embedding, edit):
        return encoder(ids)[0]


def _pipeline_images(pipeline: Any, parts: dict[str, Any], handle: Any, guidance: float, **edits: Any) -> Any:
    tokens = handle.tokenize(PROMPTS)
    negative = handle.tokenize([""] * len(PROMPTS))
    return pipeline(prompt_embeds=_embeds(parts, tokens, **edits), negative_prompt_embeds=_embeds(parts, negative),
                    num_inference_steps=3, guidance_scale=guidance, height=32, width=32,
                    generator=torch.Generator().manual_seed(7), output_type="pt").images


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_sampling_equals_the_diffusers_pipeline(pipeline: Any, tiny_parts: dict[str, Any], handle: Any,
                                                guidance: float) -> None:
    want = _pipeline_images(pipeline, tiny_parts, handle, guidance)
    got = handle.generate_images({"text": PROMPTS}, settings={**SMALL, "guidance_scale": guidance})
    assert got.shape == (2, 3, 32, 32) and got.dtype == torch.float32
    assert float(got.min()) >= 0 and float(got.max()) <= 1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_edited_prompts_equal_the_pipeline_given_the_edited_embeddings(pipeline: Any, tiny_parts: dict[str, Any],
                                                                       handle: Any) -> None:
    shift, tokens = _edits()
    plain = handle.generate_images({"text": PROMPTS}, settings=SMALL)
    shifted = handle.generate_images({"text": PROMPTS}, add={"text.token_embeds": shift}, settings=SMALL)
    torch.testing.assert_close(shifted, _pipeline_images(pipeline, tiny_parts, handle, 7.5, shift=shift),
                               atol=1e-5, rtol=0)
    inserted = handle.generate_images({"text": PROMPTS}, insert={"text.token_embeds": tokens}, settings=SMALL)
    torch.testing.assert_close(inserted, _pipeline_images(pipeline, tiny_parts, handle, 7.5, inserted=tokens),
                               atol=1e-5, rtol=0)
    assert (shifted - plain).abs().max() > 1e-3 and (inserted - plain).abs().max() > 1e-3  # the edits do act


def test_tokens_inside_the_text_encoder_lengthen_only_the_conditional_prompts(handle: Any) -> None:
    _, tokens = _edits()
    plain = handle.generate_images({"text": PROMPTS}, settings=SMALL)
    inner = handle.generate_images({"text": PROMPTS}, insert={"text.layer.1": tokens}, settings=SMALL)
    assert inner.shape == plain.shape and torch.isfinite(inner).all() and (inner - plain).abs().max() > 1e-3
    again = handle.generate_images({"text": PROMPTS}, insert={"text.layer.1": tokens}, settings=SMALL)
    assert torch.equal(inner, again)  # a scheduler and a generator of the request's own: the same images


def test_the_python_entry_sends_a_models_text_edits(handle) -> None:  # type: ignore[no-untyped-def]
    shift, _ = _edits()

    class Shifted:  # what an AdaptedModel offers generate_images: its handle, tokenize and prepare_tower
        def __init__(self) -> None:
            self.handle = handle

        def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
            return handle.tokenize(texts)

        def prepare_tower(self, modality: str, inputs: dict[str, torch.Tensor]) -> TowerRequest:
            request = TowerRequest(modality, dict(inputs))
            request.add["text.token_embeds"] = shift
            return request

    want = handle.generate_images({"text": PROMPTS}, add={"text.token_embeds": shift}, settings=SMALL)
    torch.testing.assert_close(generate_images(Shifted(), PROMPTS, SMALL), want, atol=0, rtol=0)
    plain = handle.generate_images({"text": PROMPTS}, settings=SMALL)
    torch.testing.assert_close(generate_images(handle, PROMPTS, SMALL), plain, atol=0, rtol=0)


def test_black_box_samples_and_the_exposure_record_counts_it() -> None:
    box = graytune.open_backbone("arch:sd-tiny", access="black-box")
    shift, _ = _edits()
    images = box.generate_images({"text": PROMPTS}, add={"text.token_embeds": shift}, settings=SMALL)
    assert images.shape == (2, 3, 32, 32)
    record = box.exposure.to_dict()
    assert (record["forward_queries"], record["forward_samples"]) == (1, 2)
    assert (record["generated_images"], record["denoising_steps"]) == (2, 6)  # rows x steps
    assert record["black_box_edits"] == {"calls": 1, "rows": 2, "ports": {"text.token_embeds": 2}}
    assert record["gradient_queries"] == 0


@pytest.mark.parametrize(("settings", "rows", "words"), [
    ({"num_inference_steps": 1001}, 1, "num_inference_steps must be a whole number from 1 to 1000"),
    ({"height": 33}, 1, "height=33 pixels: this model's VAE works in blocks of 2"),
    ({"width": 130}, 1, "must be a multiple of 2 up to 128"),
    ({"guidance_scale": float("nan")}, 1, "guidance_scale must be a finite number"),
    ({"guidance_scale": float("inf")}, 1, "guidance_scale must be a finite number"),
    ({"steps": 4}, 1, "unknown image settings ['steps']"),
    ({}, 65, "65 prompts in one image request; at most 64"),
])
def test_bad_requests_are_refused_before_any_work(handle: Any, monkeypatch: pytest.MonkeyPatch, settings: Any,
                                                  rows: int, words: str) -> None:
    def no_work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the sampler ran")

    monkeypatch.setattr(HFDiffusion, "sample", no_work)
    with pytest.raises(InvalidInputError) as refused:
        handle.generate_images({"text": ["a cat"] * rows}, settings=settings)
    assert words in str(refused.value)


def test_generate_draws_a_captioned_grid(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "grid.png"
    args = ["generate", "--backbone", "arch:sd-tiny", "--prompt", "a red circle", "--prompt", "a cat",
            "--prompt", "a very long prompt that cannot fit under its small image", "--out", str(out),
            "--steps", "2", "--size", "32", "--seed", "3"]
    assert main(args) == 0
    assert "3 images of 32 x 32" in capsys.readouterr().out
    with Image.open(out) as grid:
        assert grid.format == "PNG" and grid.size == grid_size(3, 32, 32) == (3 * 128, 128 + CAPTION_PX)
        caption = grid.crop((0, 128, 128, 128 + CAPTION_PX)).convert("L")
        assert caption.getextrema()[0] < 128  # the caption is drawn
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err  # never replaced unasked
    wrong = ["generate", "--backbone", "arch:sd-tiny", "--prompt", "a cat", "--out", str(tmp_path / "b.png"),
             "--max-new-tokens", "4"]
    assert main(wrong) == 2
    assert "--max-new-tokens applies to language models; arch:sd-tiny is a diffusion model" in capsys.readouterr().err
    assert main(wrong[:-2][:-2]) == 2 and "give --out GRID.png" in capsys.readouterr().err
    bad = ["generate", "--backbone", "arch:sd-tiny", "--prompt", "a cat", "--out", str(tmp_path / "c.png")]
    assert main([*bad, "--steps", "5000"]) == 2  # errors name the flag the user typed
    assert "--steps (num_inference_steps) must be a whole number from 1 to 1000" in capsys.readouterr().err
    assert main([*bad, "--size", "100000"]) == 2 and "--size (height)" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()
