"""The ``hf-vision:`` loader, on tiny random ViT and DINOv2 encoders the tests build and save.

Outputs are compared with the plain transformers model; edits at the ports with the
plain model edited by forward hooks at the same places, gradients included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import graytune
from graytune import AccessDeniedError, InvalidInputError, MissingDependencyError, PortKind
from tests.backbones.tiny_text_vision import DIM, build_tiny_bert, build_tiny_dinov2, build_tiny_vit

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-vision")
    return {
        "vit": build_tiny_vit(root / "vit"),
        "vit-no-pooler": build_tiny_vit(root / "vit-np", pooler=False, stats="processor"),
        "dinov2": build_tiny_dinov2(root / "dinov2"),  # used at 28 px: position embeddings interpolated
        "dinov2-native": build_tiny_dinov2(root / "dinov2-42", crop=42, stats=None),
    }


def _open(folder: Path, access: str = "dark-gray", **kwargs):  # type: ignore[no-untyped-def]
    kwargs.setdefault("device", "cpu")  # compared with the plain model on CPU; the gpu test covers CUDA
    return graytune.open_backbone(f"hf-vision:{folder}", access=access, **kwargs)


def _plain(folder: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModel, ViTModel

    if (folder / "processor_config.json").is_file():  # the pooler-less ViT: load it without one
        return ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
    return AutoModel.from_pretrained(folder).eval()


def _loss(z: torch.Tensor) -> torch.Tensor:
    """A fixed random read-out of ``z`` [B, D]: a squared norm would be flat where the model layer-normalises."""
    return (z * torch.randn(z.shape, generator=torch.Generator().manual_seed(7))).sum()


def _pooled(plain, pixels: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    out = plain(pixel_values=pixels)
    return out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]


def _pixels(handle, batch: int = 2, seed: int = 0) -> torch.Tensor:  # type: ignore[no-untyped-def]
    side = handle.spec.port("image.pixels").shape[-1]
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_spec_publishes_pixels_patches_entries_and_embeds(folders) -> None:  # type: ignore[no-untyped-def]
    h = _open(folders["vit"], "light-gray")
    spec = h.spec
    assert spec.modalities == ("image",)
    assert spec.port("image.pixels").shape == ("B", 3, 32, 32)
    assert spec.port("image.patch_embeds").shape == ("B", 16, DIM)  # (32 / 8) ** 2 patches, before [CLS]
    assert spec.port_names(PortKind.ENTRY) == ["image.layer.1", "image.layer.2", "image.prompts.1", "image.prompts.2"]
    assert spec.port("image.embeds").shape == ("B", DIM)
    assert "pooler" in spec.port("image.embeds").doc
    assert "pooler" not in _open(folders["vit-no-pooler"]).spec.port("image.embeds").doc
    with pytest.raises(InvalidInputError, match="no text tower"):
        h.tokenize(["a cat"])
    with pytest.raises(InvalidInputError, match=r"expected \['B', 3, 32, 32\]"):
        h.encode_image(torch.zeros(1, 3, 28, 28))


@pytest.mark.parametrize("name", ["vit", "vit-no-pooler", "dinov2", "dinov2-native"])
def test_outputs_equal_the_plain_model(folders, name) -> None:  # type: ignore[no-untyped-def]
    h = _open(folders[name], "black-box")
    pixels = _pixels(h)
    with torch.no_grad():
        ref = _pooled(_plain(folders[name]), pixels)
    torch.testing.assert_close(h.encode_image(pixels), ref)


def test_image_processor_mean_std_and_size_are_honoured(folders) -> None:  # type: ignore[no-untyped-def]
    flat = _open(folders["vit"]).spec.preprocess["image"]
    assert (flat["mean"], flat["std"], flat["stats_from"]) == ([0.2, 0.3, 0.4], [0.5, 0.6, 0.7],
                                                              "preprocessor_config.json")
    assert not (folders["vit-no-pooler"] / "preprocessor_config.json").exists()  # transformers 5 nests it here
    nested = _open(folders["vit-no-pooler"]).spec.preprocess["image"]
    assert (nested["mean"], nested["std"], nested["stats_from"]) == ([0.2, 0.3, 0.4], [0.5, 0.6, 0.7],
                                                                    "processor_config.json (image_processor)")
    fallback = _open(folders["dinov2-native"]).spec.preprocess["image"]
    assert (fallback["mean"], fallback["std"], fallback["image_size"]) == (*IMAGENET, 42)
    dinov2 = _open(folders["dinov2"]).spec
    assert dinov2.preprocess["image"]["image_size"] == 28 and dinov2.preprocess["image"]["crop"] == "center 28x28"
    assert dinov2.port("image.patch_embeds").shape == ("B", 16, DIM)  # 4 x 4 patches of 7 px


@pytest.mark.parametrize("name", ["vit", "dinov2"])
def test_add_at_patch_embeds_gives_plain_autograd_gradients(folders, name) -> None:  # type: ignore[no-untyped-def]
    h = _open(folders[name], "dark-gray")
    pixels = _pixels(h)
    shift = (0.5 * torch.randn(1, 1, DIM, generator=torch.Generator().manual_seed(2))).requires_grad_(True)
    weights = torch.randn(2, DIM, generator=torch.Generator().manual_seed(3))
    z = h.forward({"image.pixels": pixels}, add={"image.patch_embeds": shift})["image.embeds"]
    (z * weights).sum().backward()
    assert not torch.allclose(z, h.encode_image(pixels), atol=1e-3)

    plain = _plain(folders[name])
    ref_shift = shift.detach().clone().requires_grad_(True)
    plain.embeddings.patch_embeddings.register_forward_hook(lambda _m, _i, out: out + ref_shift)
    ref = _pooled(plain, pixels)
    (ref * weights).sum().backward()
    torch.testing.assert_close(z, ref.detach())
    torch.testing.assert_close(shift.grad, ref_shift.grad)


def test_tokens_inserted_at_patch_embeds_follow_cls(folders) -> None:  # type: ignore[no-untyped-def]
    h = _open(folders["dinov2"], "dark-gray")
    pixels = _pixels(h)
    tokens = torch.randn(1, 2, DIM, generator=torch.Generator().manual_seed(4))
    z = h.forward({"image.pixels": pixels}, insert={"image.patch_embeds": tokens})["image.embeds"]
    plain = _plain(folders["dinov2"])  # no position embedding for them: placed after the embeddings module
    plain.embeddings.register_forward_hook(
        lambda _m, _i, out: torch.cat([out[:, :1], tokens.expand(len(out), -1, -1), out[:, 1:]], dim=1))
    with torch.no_grad():
        torch.testing.assert_close(z, _pooled(plain, pixels))


def test_entry_ports_take_inserts_at_light_gray_only(folders) -> None:  # type: ignore[no-untyped-def]
    h = _open(folders["vit"], "light-gray")
    pixels = _pixels(h)
    prompt = torch.randn(1, 3, DIM, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    with pytest.raises(AccessDeniedError, match="light-gray"):
        _open(folders["vit"], "dark-gray").forward({"image.pixels": pixels}, insert={"image.layer.1": prompt})
    z = h.forward({"image.pixels": pixels}, insert={"image.layer.1": prompt})["image.embeds"]
    _loss(z).backward()

    plain = _plain(folders["vit"])
    ref_prompt = prompt.detach().clone().requires_grad_(True)

    def after_cls(_module, args):  # type: ignore[no-untyped-def]
        hidden = args[0]
        return (torch.cat([hidden[:, :1], ref_prompt.expand(len(hidden), -1, -1), hidden[:, 1:]], dim=1),
                *args[1:])

    plain.layers[1].register_forward_pre_hook(after_cls)
    ref = _pooled(plain, pixels)
    _loss(ref).backward()
    torch.testing.assert_close(z, ref.detach())
    torch.testing.assert_close(prompt.grad, ref_prompt.grad)


def test_patch_embeds_are_read_only_when_granted(folders) -> None:  # type: ignore[no-untyped-def]
    pixels = _pixels(_open(folders["vit"]))
    with pytest.raises(AccessDeniedError, match="grant"):
        _open(folders["vit"]).forward({"image.pixels": pixels}, reads=["image.patch_embeds"])
    h = _open(folders["vit"], reads=["image.patch_embeds"])
    only = h.forward({"image.pixels": pixels}, outputs=[], reads=["image.patch_embeds"])  # no forward
    with torch.no_grad():
        ref = _plain(folders["vit"]).embeddings.patch_embeddings(pixels)
    torch.testing.assert_close(only["image.patch_embeds"], ref)
    both = h.forward({"image.pixels": pixels}, reads=["image.patch_embeds"])
    assert set(both) == {"image.embeds", "image.patch_embeds"}
    torch.testing.assert_close(both["image.patch_embeds"], ref)


def test_other_model_types_and_missing_folders_are_clear_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInputError, match="'bert' model; hf-vision runs vit, dinov2 models"):
        _open(build_tiny_bert(tmp_path / "bert"))
    with pytest.raises(MissingDependencyError, match="is not a directory"):
        _open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingDependencyError, match="never downloads"):
        _open(tmp_path / "empty")


def test_a_bf16_owner_runs_and_returns_float32(folders) -> None:  # type: ignore[no-untyped-def]
    fp32 = _open(folders["dinov2"])
    bf16 = _open(folders["dinov2"], dtype="bf16")
    pixels = _pixels(fp32)
    shift = torch.zeros(1, 1, DIM, requires_grad=True)
    z = bf16.forward({"image.pixels": pixels}, add={"image.patch_embeds": shift})["image.embeds"]
    assert z.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(z, fp32.encode_image(pixels), dim=-1)
    assert bool((cosine > 0.98).all()), cosine
    _loss(z).backward()
    assert shift.grad is not None and shift.grad.dtype == torch.float32 and bool(torch.isfinite(shift.grad).all())


def test_processor_config_comes_before_preprocessor_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = build_tiny_vit(tmp_path / "vit", stats="processor")  # mean 0.2, 0.3, 0.4
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.9] * 3, "image_std": [0.1] * 3}))
    assert _open(folder).spec.preprocess["image"]["mean"] == [0.2, 0.3, 0.4]  # as transformers 5 reads them
    (folder / "processor_config.json").unlink()
    assert _open(folder).spec.preprocess["image"]["mean"] == [0.9] * 3
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    assert _open(folder).spec.preprocess["image"]["std"] == [1.0, 1.0, 1.0]  # pixels in [0, 1] as they are
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0, 1, 1]}))
    with pytest.raises(InvalidInputError, match="image_std.*std above 0"):
        _open(folder)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["vit", "dinov2"])
def test_a_cpu_client_of_a_bf16_gpu_owner_gets_what_fp32_on_cpu_gives(  # type: ignore[no-untyped-def]
        folders, name) -> None:
    results = []
    for placement in ({"device": "cpu"}, {"device": "cuda", "dtype": "bf16"}):
        h = _open(folders[name], "light-gray", **placement)
        shift = torch.full((1, 1, DIM), 0.05, requires_grad=True)
        prompt = torch.full((1, 2, DIM), 0.1, requires_grad=True)
        z = h.forward({"image.pixels": _pixels(h)}, add={"image.patch_embeds": shift},
                      insert={"image.layer.1": prompt})["image.embeds"]
        _loss(z).backward()
        results.append((z, shift.grad, prompt.grad))
    for ref, got in zip(*results):
        assert got.device.type == "cpu" and got.dtype == torch.float32
        assert float(torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)) > 0.98
