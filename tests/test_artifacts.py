"""Artifacts: PEFT-style folders, exact round trips, refused mismatches, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

from graytune import ArtifactError
from graytune.artifacts import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_config, save_adapter
from graytune.model import AdaptedModel
from graytune.train.recipe import open_for
from tests.conftest import build_tiny_clip

TEXTS = ["a cat", "dogs run far"]


def trained(handle, method: str) -> AdaptedModel:  # type: ignore[no-untyped-def]
    model = AdaptedModel.build(handle, method)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # a non-identity state to round-trip
    return model


@pytest.mark.parametrize("method", ["dga", "lga", "adalink", "lora"])
def test_save_then_load_gives_the_same_outputs(tiny_clip_dir, tmp_path, method: str) -> None:
    level = {"lga": "light-gray", "lora": "white-box"}.get(method, "dark-gray")
    handle = open_for(f"hf-clip:{tiny_clip_dir}", level, method)
    model = trained(handle, method)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_i, ref_t = model.encode_image(pixels), model.encode_text(TEXTS)
    folder = save_adapter(model, tmp_path / "a", extra={"task": "retrieval"})
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    config = read_config(folder)
    assert config["method"] == method and config["fingerprint"] == handle.spec.fingerprint
    assert config["access"] == level and "exposure" in config and config["task"] == "retrieval"
    loaded = load_adapter(folder, open_for(f"hf-clip:{tiny_clip_dir}", level, method))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), ref_i)
        torch.testing.assert_close(loaded.encode_text(TEXTS), ref_t)


def test_artifact_holds_adapter_tensors_only(tiny_clip_dir, tmp_path) -> None:
    from safetensors.torch import load_file

    handle = open_for(f"hf-clip:{tiny_clip_dir}", "white-box", "lora")
    folder = save_adapter(trained(handle, "lora"), tmp_path / "lora")
    keys = load_file(str(folder / WEIGHTS_NAME))
    assert all("lora_" in k or k == "logit_scale" for k in keys), sorted(keys)[:5]
    dga = save_adapter(trained(open_for(f"hf-clip:{tiny_clip_dir}", "dark-gray", "dga"), "dga"), tmp_path / "d")
    assert not any(k.startswith("backbone_module") for k in load_file(str(dga / WEIGHTS_NAME)))


def test_mismatched_backbone_is_refused_naming_both(tiny_clip_dir, tmp_path) -> None:
    folder = save_adapter(trained(open_for(f"hf-clip:{tiny_clip_dir}", "dark-gray", "dga"), "dga"), tmp_path / "a")
    other_dir = build_tiny_clip(tmp_path / "other")
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(other_dir)
    with torch.no_grad():
        clip.text_projection.weight.mul_(2.0)
    clip.save_pretrained(other_dir)
    with pytest.raises(ArtifactError, match=r"trained on backbone 'hf-clip:.*this handle is 'hf-clip:.*other"):
        load_adapter(folder, open_for(f"hf-clip:{other_dir}", "dark-gray", "dga"))


def test_missing_and_damaged_artifacts(tiny_clip_dir, tmp_path) -> None:
    handle = open_for(f"hf-clip:{tiny_clip_dir}", "dark-gray", "dga")
    with pytest.raises(ArtifactError, match="adapter_config.json is missing"):
        load_adapter(tmp_path / "nothing", handle)
    folder = save_adapter(trained(handle, "dga"), tmp_path / "a")
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(ArtifactError, match="adapter_model.safetensors is missing"):
        load_adapter(folder, handle)
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match="damaged"):
        read_config(folder)
    bad = save_adapter(trained(handle, "dga"), tmp_path / "b")
    config = json.loads((bad / CONFIG_NAME).read_text())
    config["method"] = "output"
    (bad / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="does not fit method 'output'"):
        load_adapter(bad, handle)


def test_saving_again_replaces_atomically(tiny_clip_dir, tmp_path) -> None:
    handle = open_for(f"hf-clip:{tiny_clip_dir}", "dark-gray", "dga")
    first = trained(handle, "dga")
    save_adapter(first, tmp_path / "a")
    second = trained(handle, "dga")
    save_adapter(second, tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging or old folders left
    loaded = load_adapter(tmp_path / "a", handle)
    torch.testing.assert_close(loaded.logit_scale, second.logit_scale)
