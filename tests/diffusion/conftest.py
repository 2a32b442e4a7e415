"""Fixtures of the diffusion tests: the tiny pipeline's parts (the same seeded weights as ``arch:sd-tiny``), the
diffusers pipeline made of them, and a folder it was saved to (what a user's ``hf-diffusion:`` folder holds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from graytune.backbones.diffusion_tiny import build_tiny_parts


def make_pipeline(parts: dict[str, Any]) -> Any:
    """A diffusers ``StableDiffusionPipeline`` of ``parts`` (no safety checker: nothing to check on random weights)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.fixture(scope="session")
def tiny_parts() -> dict[str, Any]:
    """The reference: plain diffusers and transformers modules with the weights ``arch:sd-tiny`` has."""
    parts = build_tiny_parts()
    for name in ("text_encoder", "unet", "vae"):
        parts[name].requires_grad_(False)
    return parts


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline saved with ``StableDiffusionPipeline.save_pretrained``."""
    folder = tmp_path_factory.mktemp("sd-tiny")
    make_pipeline(build_tiny_parts()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def diffusion_ids(sd_folder: Path) -> list[str]:
    """Both ways in: the random-weight id and the loader of a user's folder (same weights)."""
    return ["arch:sd-tiny", f"hf-diffusion:{sd_folder}"]
