"""A hub id is never fetched unless the user allows it: transformers is told local_files_only, so an unreachable
hub fails at once (it retried for about 25 s before) with the recipe and the opt-in named."""

from __future__ import annotations

import pytest

import graytune
from graytune.errors import MissingDependencyError


@pytest.fixture
def asked(monkeypatch) -> list[dict]:  # type: ignore[no-untyped-def]
    """The keyword arguments transformers' config reader gets; it finds nothing, as on a machine without the model."""
    from transformers import PretrainedConfig

    calls: list[dict] = []

    def get_config_dict(cls, where, **kwargs):  # type: ignore[no-untyped-def]
        calls.append({"where": where, **kwargs})
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {where}.\nCheck your "
                      "internet connection or see how to run the library in offline mode")

    monkeypatch.setattr(PretrainedConfig, "get_config_dict", classmethod(get_config_dict))
    return calls


def test_a_hub_id_is_looked_up_locally_only(asked, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("GRAYTUNE_ALLOW_DOWNLOADS", raising=False)
    with pytest.raises(MissingDependencyError) as caught:
        graytune.open_backbone("hf-clip:openai/clip-vit-base-patch32")
    assert asked and all(call["local_files_only"] is True for call in asked)
    message = str(caught.value)
    assert "save_pretrained" in message and "GRAYTUNE_ALLOW_DOWNLOADS=1" in message and "processor" in message
    assert "offline mode" not in message  # transformers' own advice is about the hub graytune does not use


def test_downloads_are_the_users_choice(asked, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("GRAYTUNE_ALLOW_DOWNLOADS", "1")
    with pytest.raises(MissingDependencyError):
        graytune.open_backbone("hf-siglip:google/siglip-base-patch16-224")
    assert asked and asked[0]["local_files_only"] is False


def test_a_local_folder_still_loads(tiny_clip_dir, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("GRAYTUNE_ALLOW_DOWNLOADS", raising=False)
    assert graytune.open_backbone(f"hf-clip:{tiny_clip_dir}").spec.id == f"hf-clip:{tiny_clip_dir}"


def test_the_readmes_bring_your_own_clip_lines_give_a_folder_hf_clip_loads(tiny_clip_dir, tmp_path,
                                                                          monkeypatch) -> None:
    """The README's recipe, run on a local stand-in for the hub id: the model, tokenizer and image processor it
    saves are what hf-clip reads (the processor's mean and std reach the spec)."""
    import re
    import shutil
    from pathlib import Path

    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    recipe = re.search(r"\*\*Bring your own CLIP\.\*\*.*?```py\n(.*?)```", readme, flags=re.S).group(1)
    hub = tmp_path / "hub-stand-in"
    shutil.copytree(tiny_clip_dir, hub)
    mean, std = [0.25, 0.5, 0.75], [0.2, 0.3, 0.4]
    CLIPProcessor(image_processor=CLIPImageProcessor(image_mean=mean, image_std=std, size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=CLIPTokenizer.from_pretrained(str(tiny_clip_dir))).save_pretrained(hub)
    assert recipe.count('"openai/clip-vit-base-patch32"') == 2
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GRAYTUNE_ALLOW_DOWNLOADS", raising=False)
    exec(compile(recipe.replace('"openai/clip-vit-base-patch32"', repr(str(hub))), "README recipe", "exec"), {})
    spec = graytune.open_backbone("hf-clip:./clip-b32").spec
    assert spec.preprocess["image"]["mean"] == pytest.approx(mean)
    assert spec.preprocess["image"]["std"] == pytest.approx(std)
