"""Bad requests and folders the diffusion backbone refuses with a clear error before any work, and what
``graytune info`` says of it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import graytune
from graytune import InvalidInputError, MissingDependencyError
from graytune.backbones.diffusion import HFDiffusion
from graytune.cli.main import main

PRED = "unet.prediction"
TEXTS = ["a photo of a cat", "the dog"]


@pytest.fixture(scope="module")
def handle():  # type: ignore[no-untyped-def]
    return graytune.open_backbone("arch:sd-tiny", access="dark-gray")


@pytest.fixture
def no_work(monkeypatch):  # type: ignore[no-untyped-def]
    """Counts the backbone's work (text encoder, UNet, VAE): every refusal below must leave it at zero."""
    calls: list[str] = []
    for name in ("encode_prompts", "predict", "encode_images"):
        monkeypatch.setattr(HFDiffusion, name, lambda *a, _n=name, **k: calls.append(_n))
    return calls


def _request(batch: int = 2, channels: int = 4, timestep: object = None) -> dict:  # type: ignore[type-arg]
    t = torch.tensor([10, 500][:batch]) if timestep is None else timestep
    return {"text": TEXTS[:batch], "latents.noisy": torch.zeros(batch, channels, 8, 8), "timestep": t}


@pytest.mark.parametrize("latents, says", [
    (torch.zeros(2, 3, 8, 8), r"expected \['B', 4, 'h', 'w'\]"),
    (torch.zeros(2, 4, 8), r"got shape \[2, 4, 8\], expected \['B', 4, 'h', 'w'\]"),
    (torch.zeros(3, 4, 8, 8), "inputs disagree on batch size"),
    (torch.zeros(2, 4, 8, 8, dtype=torch.float64), r"takes float32 \(convert with .float\(\)\)"),
    (torch.full((2, 4, 8, 8), float("nan")), "NaN or infinite"),
])
def test_bad_latents_are_refused(handle, no_work, latents, says) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInputError, match=says):
        handle.forward({**_request(), "latents.noisy": latents})
    assert no_work == []


@pytest.mark.parametrize("timestep, says", [
    (torch.tensor([10, 1000]), r"got values 10..1000; .* send one whole number in \[0, 1000\) per row"),
    (torch.tensor([-1, 5]), r"got values -1..5"),
    (torch.tensor([10.0, 20.0]), "the port takes int64"),
    (torch.tensor(10), r"got shape \[\], expected \['B'\]"),
])
def test_bad_timesteps_are_refused(handle, no_work, timestep, says) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInputError, match=says):
        handle.forward(_request(timestep=timestep))
    assert no_work == []


def test_a_prediction_needs_timesteps_and_prompts(handle, no_work) -> None:  # type: ignore[no-untyped-def]
    request = _request()
    with pytest.raises(InvalidInputError, match=r"this call sent no timestep; send timestep: \[B\] int64"):
        handle.forward({k: v for k, v in request.items() if k != "timestep"}, outputs=[PRED])
    with pytest.raises(InvalidInputError, match="sent no text; send text: the prompts.*the empty prompt '' gives"):
        handle.forward({k: v for k, v in request.items() if k != "text"}, outputs=[PRED])
    with pytest.raises(InvalidInputError, match="output unet.prediction needs latents inputs"):
        handle.forward({"text": TEXTS}, outputs=[PRED])
    assert no_work == []


def test_bad_pixels_are_refused(handle, no_work) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInputError, match=r"got 15x16 pixels; the VAE downsamples by 2, .* \(e.g. 14x16\)"):
        handle.forward({"image.pixels": torch.zeros(1, 3, 15, 16)})
    with pytest.raises(InvalidInputError, match="image.latents is forward only"):
        handle.forward({"image.pixels": torch.zeros(1, 3, 16, 16, requires_grad=True)})
    with pytest.raises(InvalidInputError, match=r"expected \['B', 3, 'H', 'W'\]"):
        handle.forward({"image.pixels": torch.zeros(1, 4, 16, 16)})
    assert no_work == []


def _edit_json(path, **changes) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("file, changes, says", [
    ("model_index.json", {"_class_name": "StableDiffusionXLPipeline"},
     r"'StableDiffusionXLPipeline' pipeline \(SDXL .*\); hf-diffusion runs Stable Diffusion 1.x and 2.x"),
    ("model_index.json", {"unet": ["diffusers", "UNet2DModel"]}, "has unet = .* takes UNet2DConditionModel there"),
    ("model_index.json", {"scheduler": ["diffusers", "MadeUpScheduler"]}, "names the scheduler 'MadeUpScheduler'"),
    ("unet/config.json", {"in_channels": 9}, "the UNet takes 9 channels and returns 4, but the VAE's latents have 4"),
    ("unet/config.json", {"addition_embed_type": "text_time"}, "conditioning SD 1.x/2.x do not have"),
    ("unet/config.json", {"cross_attention_dim": 16}, "cross-attends at width 16, but the text encoder is 8 wide"),
])
def test_unsupported_folders_are_refused_before_loading(sd_folder, tmp_path, monkeypatch, file, changes,
                                                        says) -> None:  # type: ignore[no-untyped-def]
    from diffusers import UNet2DConditionModel

    folder = shutil.copytree(sd_folder, tmp_path / "sd")
    _edit_json(folder / file, **changes)
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(InvalidInputError, match=says):
        graytune.open_backbone(f"hf-diffusion:{folder}")


def test_missing_folders_are_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MissingDependencyError, match="is not a directory"):
        graytune.open_backbone(f"hf-diffusion:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingDependencyError, match="no model_index.json .* StableDiffusionPipeline.save_pretrained"):
        graytune.open_backbone(f"hf-diffusion:{tmp_path / 'empty'}")
    with pytest.raises(MissingDependencyError, match="a hub id in the local cache .*never downloads on its own"):
        graytune.open_backbone("hf-diffusion:someone/not-cached-sd")  # HF_HUB_OFFLINE: nothing is fetched


def test_a_folder_without_a_part_is_a_clear_error(sd_folder, tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = shutil.copytree(sd_folder, tmp_path / "sd")
    shutil.rmtree(folder / "vae")
    with pytest.raises(MissingDependencyError, match="has no vae/config.json"):
        graytune.open_backbone(f"hf-diffusion:{folder}")


def test_known_backbones_name_both_ids() -> None:
    names = graytune.known_backbones()
    assert "arch:sd-tiny" in names and "hf-diffusion:<Stable Diffusion dir or hub id>" in names


def test_info_describes_the_tiny_pipeline(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", "arch:sd-tiny", "--access", "light-gray"]) == 0
    out = capsys.readouterr().out
    assert "modalities   text, latents, image" in out and "mechanics only" in out
    for row in ("unet.prediction", "latents.noisy", "timestep", "image.latents", "text.layer.1", "[B, 4, H/2, W/2]"):
        assert row in out
    assert "DDIMScheduler" in out and "num_train_timesteps=1000" in out
    assert "image.latents for image.pixels" in out and "forward only: never a gradient" in out
