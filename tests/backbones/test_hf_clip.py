"""The Hugging Face CLIP loader, on a tiny random CLIP the test builds and saves.

No real CLIP weights can be had on these machines; the loader is the real code
users run on their own checkpoints.
"""

from __future__ import annotations

import json

import pytest
import torch

import graytune
from graytune import MissingDependencyError, PortKind
from graytune.backbones.hf_clip import OPENAI_MEAN, OPENAI_STD
from tests.conftest import build_tiny_clip


def test_spec_has_both_towers_and_fixed_image_size(tiny_clip_dir) -> None:  # type: ignore[no-untyped-def]
    spec = graytune.open_backbone(f"hf-clip:{tiny_clip_dir}", access="light-gray").spec
    assert spec.port("image.pixels").shape == ("B", 3, 32, 32)
    assert spec.port("text.embeds").shape == ("B", 16) == spec.port("image.embeds").shape
    assert spec.port_names(PortKind.ENTRY) == ["image.layer.1", "image.layer.2", "image.prompts.1", "image.prompts.2",
                                               "text.layer.1", "text.layer.2", "text.prompts.1", "text.prompts.2"]


def test_outputs_equal_clipmodel_features(tiny_clip_dir) -> None:  # type: ignore[no-untyped-def]
    bid = f"hf-clip:{tiny_clip_dir}"
    h = graytune.open_backbone(bid, access="black-box")
    clip = graytune.open_backbone(bid, access="white-box").module()
    tokens = h.tokenize(["a cat", "dogs run far away"])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_t = clip.get_text_features(input_ids=tokens["text.input_ids"],
                                       attention_mask=tokens["text.attention_mask"]).pooler_output
        ref_i = clip.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(h.encode_text(tokens), ref_t)
    torch.testing.assert_close(h.encode_image(pixels), ref_i)


def test_wrong_image_size_is_refused(tiny_clip_dir) -> None:  # type: ignore[no-untyped-def]
    h = graytune.open_backbone(f"hf-clip:{tiny_clip_dir}")
    with pytest.raises(graytune.InvalidInputError, match=r"expected \['B', 3, 32, 32\]"):
        h.encode_image(torch.zeros(1, 3, 64, 64))


def test_fingerprint_follows_the_weights(tmp_path) -> None:  # type: ignore[no-untyped-def]
    a = build_tiny_clip(tmp_path / "a")
    first = graytune.open_backbone(f"hf-clip:{a}").fingerprint
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(a)
    with torch.no_grad():
        model.text_projection.weight.add_(1.0)
    model.save_pretrained(a)
    assert graytune.open_backbone(f"hf-clip:{a}").fingerprint != first


def test_missing_folder_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MissingDependencyError, match="is not a directory"):
        graytune.open_backbone(f"hf-clip:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingDependencyError, match="never downloads"):
        graytune.open_backbone(f"hf-clip:{tmp_path / 'empty'}")


def _save_image_processor(folder, mean, std, flat: bool = False) -> None:  # type: ignore[no-untyped-def]
    """Save an image processor with a custom mean/std: in a CLIPProcessor (transformers 5 writes it nested
    in processor_config.json) or alone (``flat``: preprocessor_config.json, as older versions did)."""
    from transformers import CLIPImageProcessorPil, CLIPProcessor, CLIPTokenizer

    images = CLIPImageProcessorPil(image_mean=mean, image_std=std, size={"shortest_edge": 32},
                                   crop_size={"height": 32, "width": 32})
    if flat:
        images.save_pretrained(folder)
    else:
        CLIPProcessor(image_processor=images, tokenizer=CLIPTokenizer.from_pretrained(folder)).save_pretrained(folder)


def test_custom_mean_and_std_come_from_processor_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = build_tiny_clip(tmp_path / "c")
    _save_image_processor(folder, [0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    assert "image_processor" in json.loads((folder / "processor_config.json").read_text())  # nested, as written
    assert not (folder / "preprocessor_config.json").exists()
    image = graytune.open_backbone(f"hf-clip:{folder}").spec.preprocess["image"]
    assert image["mean"] == [0.1, 0.2, 0.3] and image["std"] == [0.4, 0.5, 0.6]
    assert image["mean_std_from"] == "processor_config.json (image_processor)"


def test_mean_and_std_from_preprocessor_config_else_openai(tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = build_tiny_clip(tmp_path / "c")
    image = graytune.open_backbone(f"hf-clip:{folder}").spec.preprocess["image"]
    assert image["mean"] == OPENAI_MEAN and image["std"] == OPENAI_STD
    assert image["mean_std_from"] == "OpenAI CLIP's mean/std (the checkpoint has no image processor config)"
    _save_image_processor(folder, [0.2, 0.2, 0.2], [0.3, 0.3, 0.3], flat=True)
    image = graytune.open_backbone(f"hf-clip:{folder}").spec.preprocess["image"]
    assert image["mean"] == [0.2] * 3 and image["mean_std_from"] == "preprocessor_config.json"
    _save_image_processor(folder, [0.1, 0.2, 0.3], [0.4, 0.5, 0.6])  # the nested one wins, as in transformers
    assert graytune.open_backbone(f"hf-clip:{folder}").spec.preprocess["image"]["mean"] == [0.1, 0.2, 0.3]


def test_a_broken_mean_or_std_is_an_error_not_a_fallback(tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = build_tiny_clip(tmp_path / "c")
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": {
        "image_mean": [0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}}))
    with pytest.raises(graytune.InvalidInputError, match=r"processor_config.json \(image_processor\): image_mean"):
        graytune.open_backbone(f"hf-clip:{folder}")
