"""Adapting the tiny random diffusion pipeline (``arch:sd-tiny``; no real diffusion weights exist here): every method
of the ladder builds from the registry, its prediction and gradients equal plain diffusers autograd with the same
edits, the denoising task is the scheduler's forward process, training runs end to end from ``graytune train`` and
the artifact reloads by itself. Mechanics only: nothing here measures image quality."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import graytune
from graytune.artifacts import load_adapter
from graytune.data.catalog import load_splits
from graytune.errors import InvalidInputError
from graytune.methods import METHODS, backbone_kind
from graytune.model import AdaptedModel
from graytune.recipes.run import make_task, open_for
from graytune.train.denoising import DenoisingTask
from tests.diffusion.conftest import make_pipeline
from tests.diffusion.reference import hooked

DIFFUSION_METHODS = ["zero-shot", "dga", "prompt", "prompt-zo", "lga", "lga-deep", "adalink", "lora", "full"]
TEXTS = ["a photo of a cat", "the dog"]


@pytest.fixture(scope="module")
def concept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 12 small images of one 'concept' (coloured squares), two with a caption beside them."""
    root = tmp_path_factory.mktemp("concept")
    for i in range(12):
        g = torch.Generator().manual_seed(i)
        pixels = (torch.rand(24, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{i:02d}.png")
    (root / "00.txt").write_text("on a red sofa\n", encoding="utf-8")
    (root / "03.txt").write_text("in  the snow", encoding="utf-8")
    return root


def _batch(handle: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {**handle.tokenize(TEXTS), "latents.noisy": torch.randn(2, 4, 8, 8, generator=g),
            "timestep": torch.tensor([10, 731])}


def _noisy(model: AdaptedModel) -> None:
    """Give every adapter tensor a random value (they start at the identity, where a wrong edit would not show)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in [*model.text_adapters.parameters()]:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def test_registry_names_the_diffusion_methods() -> None:
    handle = graytune.open_backbone("arch:sd-tiny", access="white-box")
    assert backbone_kind(handle.spec) == "diffusion"
    assert [name for name, m in METHODS.items() if "diffusion" in m.backbones] == DIFFUSION_METHODS
    with pytest.raises(InvalidInputError, match="arch:sd-tiny is a diffusion, whose methods are zero-shot, dga"):
        AdaptedModel.build(handle, "output")
    model = AdaptedModel.build(handle, "dga")
    assert len(model.image_adapters) == 0 and [a.name for a in model.text_adapters] == ["dga-text"]


@pytest.mark.parametrize("method", DIFFUSION_METHODS)
def test_every_method_predicts_and_trains_only_its_own_tensors(method: str) -> None:
    handle = open_for("arch:sd-tiny", None, method)
    model = AdaptedModel.build(handle, method)
    prediction = model.predict_noise(_batch(handle))
    assert prediction.shape == (2, 4, 8, 8) and torch.isfinite(prediction).all()
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    if method in ("zero-shot", "prompt-zo"):
        assert not trained  # nothing, or trained zeroth-order from forward calls alone
        return
    prediction.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in model.named_parameters()
               if n in trained)
    if method == "lora":
        assert trained and all(".unet." in n and "lora_" in n for n in trained)
        assert model.adapter_options()["lora"]["targets"] == ("to_q", "to_k", "to_v", "to_out.0")
    elif method == "full":
        unet = sum(p.numel() for p in handle.module().unet.parameters())
        assert all(n.startswith("backbone_module.unet.") for n in trained)
        assert model.trainable_parameters() == unet
    else:
        assert all(not n.startswith("backbone_module") for n in trained)


def _reference_dga_states(parts: dict[str, Any], tokens: dict[str, torch.Tensor], shift: torch.Tensor,
                          extra: torch.Tensor) -> torch.Tensor:
    """Plain autograd: the text encoder's states with ``shift`` added to every real token's embedding and ``extra``
    placed before each end token (the last padding column drops off)."""
    ids, mask = tokens["text.input_ids"], tokens["text.attention_mask"]
    lookup = parts["text_encoder"].embeddings.token_embedding
    end_id = int(parts["text_encoder"].config.eos_token_id)
    ends = [int((row == end_id).nonzero()[0]) for row in ids]
    shifted = F.embedding(ids, lookup.weight) + shift * mask.unsqueeze(-1)  # [B, L, D]
    new_ids = torch.stack([torch.cat([row[:e], torch.zeros(1, dtype=ids.dtype), row[e:]])[:ids.shape[1]]
                           for row, e in zip(ids, ends)])

    def put(_m: Any, _i: Any, _out: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.cat([row[:e], extra[0], row[e:]])[:ids.shape[1]] for row, e in zip(shifted, ends)])

    with hooked(lookup, put):
        return parts["text_encoder"](new_ids)[0]


def _reference_dga(parts: dict[str, Any], tokens: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                   shift: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """The UNet's prediction conditioned on ``_reference_dga_states``."""
    hidden = _reference_dga_states(parts, tokens, shift, extra)
    return parts["unet"](batch["latents.noisy"], batch["timestep"], encoder_hidden_states=hidden).sample


def test_dga_prediction_and_gradients_equal_plain_diffusers(tiny_parts) -> None:  # type: ignore[no-untyped-def]
    handle = open_for("arch:sd-tiny", None, "dga")
    model = AdaptedModel.build(handle, "dga")
    _noisy(model)
    batch = _batch(handle)
    adapter = model.text_adapters[0]
    ours = model.predict_noise(batch)
    ours.pow(2).sum().backward()
    shift, extra = (adapter.shift.detach().clone().requires_grad_(True),
                    adapter.extra.detach().clone().requires_grad_(True))
    theirs = _reference_dga(tiny_parts, {k: batch[k] for k in ("text.input_ids", "text.attention_mask")}, batch,
                            shift, extra)
    theirs.pow(2).sum().backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.shift.grad, shift.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(adapter.extra.grad, extra.grad, rtol=1e-4, atol=1e-6)


def test_a_dga_models_images_equal_the_pipeline_given_its_prompt_embeds(tiny_parts) -> None:  # type: ignore[no-untyped-def]
    """textual inversion's shape, sampled by the owner, equals diffusers' pipeline given the edited embeddings."""
    handle = open_for("arch:sd-tiny", None, "dga")
    model = AdaptedModel.build(handle, "dga")
    _noisy(model)
    adapter = model.text_adapters[0]
    settings = {"num_inference_steps": 3, "seed": 7, "height": 32, "width": 32, "guidance_scale": 7.5}
    got = model.generate_images(TEXTS, settings)
    pipe = make_pipeline(tiny_parts)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        embeds = _reference_dga_states(tiny_parts, handle.tokenize(TEXTS), adapter.shift, adapter.extra)
        negative = tiny_parts["text_encoder"](handle.tokenize([""] * len(TEXTS))["text.input_ids"])[0]
        want = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=3, guidance_scale=7.5,
                    height=32, width=32, generator=torch.Generator().manual_seed(7), output_type="pt").images
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - model.handle.generate_images({"text": TEXTS}, settings=settings)).abs().max() > 1e-3  # it edits


def test_lora_prediction_equals_peft_on_the_plain_unet(tiny_parts) -> None:  # type: ignore[no-untyped-def]
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    handle = open_for("arch:sd-tiny", None, "lora")
    model = AdaptedModel.build(handle, "lora")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    unet = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                                   copy.deepcopy(tiny_parts["unet"]))
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(ours[f"backbone_module.unet.{name}"])
    batch = _batch(handle)
    hidden = tiny_parts["text_encoder"](batch["text.input_ids"])[0]
    expected = unet(batch["latents.noisy"], batch["timestep"], encoder_hidden_states=hidden).sample
    torch.testing.assert_close(model.predict_noise(batch), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["dga", "lga", "adalink", "lora", "full"])
def test_artifact_reloads_by_itself(method: str, tmp_path: Path) -> None:
    handle = open_for("arch:sd-tiny", None, method)
    model = AdaptedModel.build(handle, method)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch = _batch(handle)
    model.save_pretrained(tmp_path / method)
    again = load_adapter(tmp_path / method, open_for("arch:sd-tiny", None, method))
    torch.testing.assert_close(again.predict_noise(batch), model.predict_noise(batch), rtol=0, atol=0)


def test_noised_batches_are_the_schedulers_forward_process(concept: Path) -> None:
    from diffusers import DDPMScheduler

    handle = graytune.open_backbone("arch:sd-tiny")
    task = DenoisingTask(load_splits(str(concept)).train, handle, "a picture of {}")
    reference_scheduler = DDPMScheduler.from_config(handle.spec.preprocess["latents"]["scheduler"]["config"])
    clean, noise, steps = task.latents[:3], torch.randn(3, *task.latents.shape[1:]), torch.tensor([0, 499, 999])
    batch = task.noised(clean, noise, steps, {})
    torch.testing.assert_close(batch["latents.noisy"], reference_scheduler.add_noise(clean, noise, steps))
    torch.testing.assert_close(batch["target"], noise)
    task.prediction = "v_prediction"
    torch.testing.assert_close(task.noised(clean, noise, steps, {})["target"],
                               reference_scheduler.get_velocity(clean, noise, steps))


def test_latents_come_from_the_owners_vae_and_prompts_from_captions(concept: Path, tiny_parts) -> None:  # type: ignore[no-untyped-def]
    handle = graytune.open_backbone("arch:sd-tiny", access="black-box")  # a VAE encode is a forward: black-box
    data = load_splits(str(concept), seed=0).train
    task = DenoisingTask(data, handle, "a picture of {}", image_size=16)
    assert task.latents.shape == (len(data), 4, 8, 8)
    pixels = task.preprocess([Image.open(p) for p in data.images[:2]])
    expected = tiny_parts["vae"].encode(pixels).latent_dist.mean * tiny_parts["vae"].config.scaling_factor
    torch.testing.assert_close(task.latents[:2], expected, rtol=1e-5, atol=1e-6)
    captions = dict(zip([p.name for p in data.images], task.prompts(data)))
    assert captions.get("00.png", "a picture of on a red sofa") == "a picture of on a red sofa"
    assert captions.get("03.png", "a picture of in the snow") == "a picture of in the snow"
    assert any(prompt == "a picture of" or prompt == "a picture of " for prompt in captions.values())
    assert handle.exposure.forward_queries > 0 and handle.exposure.gradient_queries == 0


def test_held_out_loss_is_deterministic_and_training_lowers_it(concept: Path) -> None:
    splits = load_splits(str(concept))
    handle = open_for("arch:sd-tiny", None, "full")
    task = make_task(splits, handle, 16)
    model = AdaptedModel.build(handle, "full")
    before = task.evaluate(model, splits.train)
    assert task.evaluate(model, splits.train) == before and before["denoise_score"] == -before["denoise_mse"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        for batch in task.batches(4, generator):
            optimizer.zero_grad()
            task.loss(model, batch).backward()
            optimizer.step()
    assert task.evaluate(model, splits.train)["denoise_mse"] < before["denoise_mse"]


def test_data_the_kind_does_not_train_on_is_refused(concept: Path) -> None:
    diffusion = graytune.open_backbone("arch:sd-tiny")
    with pytest.raises(InvalidInputError, match="wordnet-supersense is classification data of texts and arch:sd-tiny "
                                                "is a diffusion model: diffusion models train on images"):
        make_task(load_splits("wordnet-supersense"), diffusion, None)
    with pytest.raises(InvalidInputError, match="is generation data .* diffusion models train on images"):
        make_task(load_splits("wordnet-category"), diffusion, None)
    encoder = graytune.open_backbone("minilm")
    with pytest.raises(InvalidInputError, match="is images data and minilm is an encoder"):
        make_task(load_splits(str(concept)), encoder, None)
    with pytest.raises(InvalidInputError, match="--image-size: got 15; arch:sd-tiny takes images whose side is a "
                                                "multiple of 2, at most 128"):
        make_task(load_splits(str(concept)), diffusion, 15)
    with pytest.raises(InvalidInputError, match="got 100000; .* at most 128 \\(twice its own 64\\)"):
        make_task(load_splits(str(concept)), diffusion, 100000)  # refused before any image is read


def test_a_few_images_are_every_split_with_a_note(tmp_path: Path, concept: Path) -> None:
    for name in ("00.png", "01.png", "02.png", "00.txt"):
        (tmp_path / name).write_bytes((concept / name).read_bytes())
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folders and files do not make it a class-folder tree
    (tmp_path / ".ipynb_checkpoints" / "00-checkpoint.png").write_bytes((concept / "00.png").read_bytes())
    splits = load_splits(str(tmp_path))
    assert splits.task == "images" and splits.whole and len(splits.train) == 3
    assert "too few to hold some out" in splits.note
    assert splits.train.captions[0] == "on a red sofa"


def test_graytune_train_on_a_concept_folder(concept: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from graytune.cli.main import main

    out = tmp_path / "run"
    code = main(["train", "--backbone", "arch:sd-tiny", "--method", "dga", "--data", str(concept), "--max-steps", "4",
                 "--batch-size", "2", "--eval-every", "2", "--image-size", "16", "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"] == "images" and summary["steps"] == 4 and summary["trainable_parameters"] == 16
    assert set(summary["test"]) == {"denoise_score", "denoise_mse"} and summary["test"]["denoise_mse"] > 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["method"] == "dga" and config["backbone"] == "arch:sd-tiny" and config["task"] == "images"
    again = load_adapter(out, open_for("arch:sd-tiny", None, "dga"))
    assert again.trainable_parameters() == 16
    from graytune.recipes.evaluate import evaluate_saved

    assert evaluate_saved("arch:sd-tiny", str(out), str(concept), split="test")["test"] == summary["test"]  # the same split, size


def test_templates_are_drawn_per_row_recorded_and_checked(concept: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from graytune.cli.main import main

    handle = graytune.open_backbone("arch:sd-tiny")
    splits = load_splits(str(concept))
    templates = ["a picture of {}", "a painting in the style of {}"]
    task = make_task(splits, handle, 16, templates=templates)
    assert task.prompts(splits.train, templates[1])[0].startswith("a painting in the style of")
    first, second = handle.tokenize(["a picture of"])["text.input_ids"][0], \
        handle.tokenize(["a painting in the style of"])["text.input_ids"][0]
    seen = {tuple(row.tolist()) for batch in task.batches(4, torch.Generator().manual_seed(0))
            for row in batch["text.input_ids"]}
    assert any(row[:6] == tuple(first[:6].tolist()) for row in seen)
    assert any(row[:6] == tuple(second[:6].tolist()) for row in seen)  # both templates drawn
    assert all(any(t[:6] == tuple(first[:6].tolist()) for t in [tuple(r.tolist())])
               for batch in task.held_out(splits.val) for r in batch["text.input_ids"])  # held out: the first
    with pytest.raises(InvalidInputError, match=r"template 1 \('{} and {}'\) has \{\} 2 times"):
        make_task(splits, handle, 16, templates=["{} and {}"])
    with pytest.raises(InvalidInputError, match="--template sets a diffusion model's prompts; minilm is an encoder"):
        make_task(load_splits("wordnet-supersense"), graytune.open_backbone("minilm"), None, templates=["{}"])
    out = tmp_path / "run"
    assert main(["train", "--backbone", "arch:sd-tiny", "--method", "dga", "--data", str(concept), "--max-steps",
                 "2", "--batch-size", "2", "--image-size", "16", "--out", str(out), "--json", "--template",
                 templates[0], "--template", templates[1]]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert json.loads((out / "adapter_config.json").read_text())["prompt_templates"] == templates
    from graytune.recipes.evaluate import evaluate_saved

    scored = evaluate_saved("arch:sd-tiny", str(out), str(concept), split="test")["test"]  # scored with the first template, as
    assert scored == pytest.approx(summary["test"], rel=1e-6)                # training's test was
