"""Artifacts: PEFT-style folders, exact round trips, refused mismatches, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

from graytune import ArtifactError
from graytune.artifacts import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_config, save_adapter
from graytune.methods import METHODS, MethodKind
from graytune.model import AdaptedModel
from graytune.recipes.run import open_for
from tests.conftest import build_tiny_clip

TEXTS = ["a cat", "dogs run far"]

#: Non-default options for every registered method: a round trip must rebuild each exactly.
NON_DEFAULT = {
    "zero-shot": {},
    "output": {"bias": "false"},
    "output-mlp": {"reduction": "2", "mix": "0.5"},
    "dga": {"kernel": "5", "depth": "2", "channels": "4", "extra_tokens": "2", "bias": "false"},
    "dga-zo": {"kernel": "5", "extra_tokens": "3", "shift": "false", "bias": "false"},
    "prompt-zo": {"extra_tokens": "2", "shift": "true"},
    "prompt": {"extra_tokens": "3"},
    "lga": {"layers": "1", "tokens": "2", "extra_tokens": "0", "shift": "false"},
    "adalink": {"rank": "3"},
    "adalink+output": {"rank": "3", "dga-output.bias": "false"},
    "dga-id": {"extra_tokens": "2", "gate": "channel", "bias": "false"},
    "lga-id": {"layers": "1", "tokens": "2", "extra_tokens": "1", "lga.gate": "channel"},
    "lga-deep": {"layers": "1,2", "tokens": "3", "extra_tokens": "0", "lga.gate": "scalar"},
    "lora": {"rank": "4", "alpha": "8", "targets": "q_proj,k_proj"},
    "full": {},
    "transmiter": {"classes": "12", "dim": "6", "hidden_ratio": "2"},
    "transmiter+": {"classes": "10", "dim": "10", "hidden_ratio": "1"},
}


def test_the_round_trip_table_covers_every_registered_method() -> None:
    assert set(NON_DEFAULT) == set(METHODS)


@pytest.mark.parametrize("method", sorted(NON_DEFAULT))
def test_every_method_round_trips_with_non_default_options(tiny_clip_dir, tmp_path, method: str) -> None:
    if METHODS[method].kind is MethodKind.LOGIT:
        _logit_round_trip(method, tmp_path)
        return
    handle = open_for(f"hf-clip:{tiny_clip_dir}", None, method)
    model = AdaptedModel.build(handle, method, NON_DEFAULT[method])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad or not name.startswith("backbone_module."):  # zeroth-order tensors ask no gradient
                p.add_(0.05 * torch.randn_like(p))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(images=pixels, texts=TEXTS)
    folder = model.save_pretrained(tmp_path / method)
    # load needs nothing but the folder and a handle: no option, no flag
    loaded = AdaptedModel.from_pretrained(folder, open_for(f"hf-clip:{tiny_clip_dir}", None, method))
    assert loaded.adapter_options() == model.adapter_options()
    with torch.no_grad():
        out = loaded(images=pixels, texts=TEXTS)
    torch.testing.assert_close(out.logits_per_image, ref.logits_per_image, rtol=0, atol=0)
    torch.testing.assert_close(out.text_embeds, ref.text_embeds, rtol=0, atol=0)


def _logit_round_trip(method: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from graytune.transfer.transmiter import TransMiter, load_transmiter, save_transmiter

    from graytune.adapters.transmiter import TransMiterAdapter, TransMiterConfig

    opts = {k: int(v) for k, v in NON_DEFAULT[method].items()}
    names = TransMiter.create(["cat", "dog", "bird"], total=opts["classes"], seed=1).classes
    tm = TransMiter(TransMiterAdapter(TransMiterConfig(**opts)), names, 3, "a photo of a {}")
    with torch.no_grad():
        for p in tm.adapter.mlp.parameters():
            p.add_(0.1 * torch.randn_like(p))
    scores = torch.randn(5, opts["classes"])
    folder = save_transmiter(tm, tmp_path / method, "some-backbone", "f" * 64, extra={"method": method})
    loaded, config = load_transmiter(folder)
    assert config["method"] == method and config["format_version"] == 2
    assert config["options"]["transmiter"] == {"classes": opts["classes"], "dim": opts["dim"],
                                               "hidden_ratio": opts["hidden_ratio"]}
    tm.adapter.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.adapt(scores), tm.adapt(scores), rtol=0, atol=0)


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


def test_fingerprint_follows_the_weights_not_the_path(tiny_clip_dir, tmp_path, monkeypatch) -> None:
    import shutil

    import graytune

    folder = save_adapter(trained(open_for(f"hf-clip:{tiny_clip_dir}", "dark-gray", "dga"), "dga"), tmp_path / "a")
    copy = tmp_path / "elsewhere" / "my-clip"
    shutil.copytree(tiny_clip_dir, copy)
    monkeypatch.chdir(copy.parent)
    ids = [f"hf-clip:{copy}", "hf-clip:my-clip", "hf-clip:./my-clip"]
    prints = {graytune.open_backbone(i, "black-box").spec.fingerprint for i in ids}
    assert prints == {read_config(folder)["fingerprint"]}  # same weights: one fingerprint, whatever the path
    pixels = torch.randn(2, 3, 32, 32)
    original = load_adapter(folder, open_for(f"hf-clip:{tiny_clip_dir}", "dark-gray", "dga"))
    moved = load_adapter(folder, open_for("hf-clip:./my-clip", "dark-gray", "dga"))
    with torch.no_grad():
        torch.testing.assert_close(moved.encode_image(pixels), original.encode_image(pixels))
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(copy)
    with torch.no_grad():
        clip.visual_projection.weight.mul_(1.5)
    clip.save_pretrained(copy)  # other weights in the same folder: another fingerprint
    with pytest.raises(ArtifactError, match="fingerprint"):
        load_adapter(folder, open_for("hf-clip:my-clip", "dark-gray", "dga"))


def test_options_and_flags_are_refused_with_what_is_allowed(tiny_clip_dir) -> None:
    from graytune import AccessDeniedError, InvalidInputError

    handle = open_for(f"hf-clip:{tiny_clip_dir}", "white-box", "lora")
    with pytest.raises(InvalidInputError, match=r"unknown option 'rnak' \(did you mean 'rank'\?\).*rank \(int, "
                                                r"default 8\)"):
        AdaptedModel.build(handle, "lora", {"rnak": 4})
    with pytest.raises(InvalidInputError, match="option rank: 'four' is not a int"):
        AdaptedModel.build(handle, "lora", {"rank": "four"})
    with pytest.raises(InvalidInputError, match="is a logit adapter"):
        AdaptedModel.build(handle, "transmiter")
    with pytest.raises(AccessDeniedError, match="method 'lora' needs access level white-box"):
        AdaptedModel.build(open_for(f"hf-clip:{tiny_clip_dir}", "dark-gray", "dga"), "lora")
