"""Shared fixtures. Hub access is off for the whole suite: an accidental download fails fast."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
import string  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

# Every backbone the boundary must hold, with one input batch builder each.
PACKAGED = ["minilm", "efficientnet-lite0", "efficientnet-lite1",
            "bridge:efficientnet-lite0+minilm", "bridge:efficientnet-lite1+minilm"]


def build_tiny_clip(folder: Path) -> Path:
    """Save a tiny random CLIPModel and a character-level CLIP tokenizer in ``folder``.

    No real CLIP weights can exist on these machines; this exercises the real loader.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = list(string.ascii_lowercase) + list(".,!?'")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    start, end = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": start, "<|endoftext|>": end})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=32, bos_token_id=start,
                         eos_token_id=end, pad_token_id=end),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_loader_ids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``hf-siglip:``, ``hf-text:`` (MPNet) and ``hf-vision:`` (DINOv2) ids of tiny random models saved here."""
    from tests.backbones.tiny_siglip import build_tiny_siglip
    from tests.backbones.tiny_text_vision import build_tiny_dinov2, build_tiny_mpnet

    return {"hf-siglip": f"hf-siglip:{build_tiny_siglip(tmp_path_factory.mktemp('tiny-siglip'))}",
            "hf-text": f"hf-text:{build_tiny_mpnet(tmp_path_factory.mktemp('tiny-mpnet'))}",
            "hf-vision": f"hf-vision:{build_tiny_dinov2(tmp_path_factory.mktemp('tiny-dinov2'))}"}


@pytest.fixture(scope="session")
def all_backbone_ids(tiny_clip_dir: Path) -> list[str]:
    return [*PACKAGED, f"hf-clip:{tiny_clip_dir}"]


def sample_inputs(spec, batch: int = 2, size: int = 64) -> dict:  # type: ignore[no-untyped-def]
    """Seeded inputs for every modality of ``spec`` (pixels at the port's fixed size if it has one)."""
    g = torch.Generator().manual_seed(0)
    inputs: dict = {}
    if "image" in spec.modalities:
        side = spec.port("image.pixels").shape[-1]
        side = side if isinstance(side, int) else size
        inputs["image.pixels"] = torch.randn(batch, 3, side, side, generator=g)
    if "text" in spec.modalities:
        inputs["text"] = ["a small cat sleeps.", "rain on the roof!"][:batch]
    return inputs


@pytest.fixture(scope="session")
def sample_photos() -> list:
    """Two real photos shipped with scikit-learn: a Chinese palace and a daisy."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(np.asarray(a)) for a in load_sample_images().images]
