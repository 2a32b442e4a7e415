"""The Hugging Face SigLIP loader, on a tiny random SigLIP the test builds and saves.

References are the plain model's own calls (``get_text_features``,
``get_image_features``); edits are made on it by hooks, independently of
graytune's forward code.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import graytune
from graytune import InvalidInputError, MissingDependencyError, PortKind
from tests.backbones.tiny_siglip import IMAGE_SIZE, MAX_POSITIONS, build_tiny_siglip
from tests.conftest import build_tiny_clip

TEXTS = ["a cat", "dogs run far away!!!"]
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_siglip(tmp_path_factory.mktemp("tiny-siglip"))


@pytest.fixture(scope="module")
def plain(siglip_dir: Path):  # type: ignore[no-untyped-def]
    return graytune.open_backbone(f"hf-siglip:{siglip_dir}", access="white-box").module()


def _open(folder: Path, access: str = "light-gray"):  # type: ignore[no-untyped-def]
    return graytune.open_backbone(f"hf-siglip:{folder}", access=access)


def test_spec_ports_and_what_the_client_must_know(siglip_dir) -> None:  # type: ignore[no-untyped-def]
    spec = _open(siglip_dir).spec
    assert spec.port("image.pixels").shape == ("B", 3, IMAGE_SIZE, IMAGE_SIZE)
    assert spec.port("image.embeds").shape == ("B", 32) == spec.port("text.embeds").shape
    assert spec.port_names(PortKind.ENTRY) == ["image.layer.1", "image.layer.2", "image.prompts.1", "image.prompts.2",
                                               "text.layer.1", "text.layer.2", "text.prompts.1", "text.prompts.2"]
    assert spec.port_names(PortKind.OUTPUT) == ["image.embeds", "text.embeds"]  # no logit_scale / logit_bias
    text = spec.preprocess["text"]
    assert text["max_tokens"] == MAX_POSITIONS and text["pad_id"] == 1
    assert "last position" in text["pooling"] and text["insert_position"] == "just before the last position"
    assert text["attention_mask"].startswith("all ones")  # the tokenizer returns no mask, as SigLIP's do
    image = spec.preprocess["image"]
    assert image["mean"] == [0.5] * 3 == image["std"] and image["mean_std_from"].startswith("SiglipImageProcessor")


def test_tokenize_pads_every_text_to_the_context(siglip_dir) -> None:  # type: ignore[no-untyped-def]
    tokens = _open(siglip_dir).tokenize(TEXTS)
    assert tokens["text.input_ids"].shape == (2, MAX_POSITIONS)
    assert tokens["text.input_ids"][0, -1] == 1 and bool((tokens["text.attention_mask"] == 1).all())


def test_outputs_equal_siglipmodel_features(siglip_dir, plain) -> None:  # type: ignore[no-untyped-def]
    h = _open(siglip_dir, "black-box")
    tokens = h.tokenize(TEXTS)
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        ref_t = plain.get_text_features(input_ids=tokens["text.input_ids"]).pooler_output
        ref_i = plain.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(h.encode_text(tokens), ref_t)
    torch.testing.assert_close(h.encode_text(TEXTS), ref_t)
    torch.testing.assert_close(h.encode_image(pixels), ref_i)


def test_a_mask_from_the_client_is_honoured(siglip_dir, plain) -> None:  # type: ignore[no-untyped-def]
    h = _open(siglip_dir, "black-box")
    tokens = h.tokenize(TEXTS)
    tokens["text.attention_mask"] = (torch.arange(MAX_POSITIONS) < 8).long().expand(2, -1).clone()
    with torch.no_grad():
        ref = plain.get_text_features(input_ids=tokens["text.input_ids"],
                                      attention_mask=tokens["text.attention_mask"]).pooler_output
    torch.testing.assert_close(h.encode_text(tokens), ref)


def test_inserted_tokens_take_the_padding_before_the_last_position(siglip_dir, plain) -> None:  # type: ignore[no-untyped-def]
    """A shift on every token and K tokens inserted: the plain model with its token embeddings edited by a hook."""
    h = _open(siglip_dir, "dark-gray")
    tokens = h.tokenize(TEXTS)
    torch.manual_seed(0)
    shift = (0.1 * torch.randn(1, 1, 32)).requires_grad_(True)
    extra = torch.randn(1, 2, 32, requires_grad=True)
    z = h.forward(tokens, add={"text.token_embeds": shift}, insert={"text.token_embeds": extra})["text.embeds"]
    target = torch.randn(2, 32)
    F.mse_loss(z, target).backward()

    shift_ref, extra_ref = shift.detach().clone().requires_grad_(True), extra.detach().clone().requires_grad_(True)

    def edit(_module, _args, embeds):  # type: ignore[no-untyped-def]
        shifted = embeds + shift_ref  # every position is real (mask of ones)
        last = MAX_POSITIONS - 1
        return torch.cat([shifted[:, :last - 2], extra_ref.expand(2, -1, -1), shifted[:, last:]], dim=1)

    hook = plain.text_model.embeddings.token_embedding.register_forward_hook(edit)
    try:
        z_ref = plain.get_text_features(input_ids=tokens["text.input_ids"]).pooler_output
    finally:
        hook.remove()
    F.mse_loss(z_ref, target).backward()
    torch.testing.assert_close(z, z_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(shift.grad, shift_ref.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(extra.grad, extra_ref.grad, atol=ATOL, rtol=RTOL)


def test_image_entry_insert_and_add_match_plain_autograd(siglip_dir, plain) -> None:  # type: ignore[no-untyped-def]
    h = _open(siglip_dir, "light-gray")
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, requires_grad=True)
    prompt = torch.randn(1, 3, 32, requires_grad=True)
    delta = (0.1 * torch.randn(1, 1, 32)).requires_grad_(True)
    z = h.forward({"image.pixels": pixels}, add={"image.layer.2": delta},
                  insert={"image.layer.1": prompt})["image.embeds"]
    z.square().sum().backward()

    refs = [t.detach().clone().requires_grad_(True) for t in (pixels, prompt, delta)]
    layers = plain.vision_model.encoder.layers
    hooks = [layers[1].register_forward_pre_hook(lambda _m, args: (torch.cat([refs[1].expand(2, -1, -1), args[0]], 1),
                                                                    *args[1:])),
             layers[2].register_forward_pre_hook(lambda _m, args: (args[0] + refs[2], *args[1:]))]
    try:
        z_ref = plain.get_image_features(pixel_values=refs[0]).pooler_output
    finally:
        for hook in hooks:
            hook.remove()
    z_ref.square().sum().backward()
    torch.testing.assert_close(z, z_ref, atol=ATOL, rtol=RTOL)
    for got, ref in zip((pixels, prompt, delta), refs):
        torch.testing.assert_close(got.grad, ref.grad, atol=ATOL, rtol=RTOL)


def test_half_precision_and_recomputation_run_the_same_layers(siglip_dir) -> None:  # type: ignore[no-untyped-def]
    from graytune.backbones.base import recomputing
    from graytune.backbones.hf_siglip import HFSiglip

    backbone = HFSiglip.load(str(siglip_dir))
    tokens = {k: torch.cat([v[:, :-2], v[:, -1:]], 1) for k, v in backbone.tokenize(TEXTS).items()}  # room for 1
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    extra = torch.randn(1, 1, 32, requires_grad=True)
    plain = backbone.run({"image.pixels": pixels, **tokens}, {}, {"text.token_embeds": extra},
                         ["image.embeds", "text.embeds"], [])
    with recomputing(True):
        again = backbone.run({"image.pixels": pixels, **tokens}, {}, {"text.token_embeds": extra},
                             ["image.embeds", "text.embeds"], [])
    for name in plain:
        torch.testing.assert_close(again[name], plain[name])
    grad_plain = torch.autograd.grad(plain["text.embeds"].sum(), extra)[0]
    grad_again = torch.autograd.grad(again["text.embeds"].sum(), extra)[0]
    torch.testing.assert_close(grad_again, grad_plain)

    half = backbone.with_module(HFSiglip.load(str(siglip_dir)).module().to(torch.bfloat16))
    out = half.run({"image.pixels": pixels.bfloat16(), **tokens}, {}, {"text.token_embeds": extra.bfloat16()},
                   ["image.embeds", "text.embeds"], [])
    assert out["text.embeds"].dtype == torch.bfloat16
    for name in plain:
        assert F.cosine_similarity(out[name].float(), plain[name].detach(), dim=-1).min() > 0.98


def test_custom_mean_and_std_come_from_the_saved_processor(tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = build_tiny_siglip(tmp_path / "s", image_stats=([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]))
    image = _open(folder).spec.preprocess["image"]
    assert image["mean"] == [0.1, 0.2, 0.3] and image["std"] == [0.4, 0.5, 0.6]
    assert image["mean_std_from"] == "processor_config.json (image_processor)"


def test_wrong_folders_are_clear_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MissingDependencyError, match="is not a directory"):
        _open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingDependencyError, match="never downloads"):
        _open(tmp_path / "empty")
    clip = build_tiny_clip(tmp_path / "clip")
    with pytest.raises(InvalidInputError, match=f"holds a model of type 'clip'.*use hf-clip:{clip}"):
        _open(clip)
    with pytest.raises(InvalidInputError, match="use hf-siglip:"):
        graytune.open_backbone(f"hf-clip:{build_tiny_siglip(tmp_path / 'sig')}")


def test_a_sentencepiece_tokenizer_without_sentencepiece_says_what_to_install(tmp_path) -> None:  # type: ignore[no-untyped-def]
    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed here")
    folder = build_tiny_siglip(tmp_path / "spm")
    (folder / "tokenizer.json").unlink()
    (folder / "spiece.model").write_bytes(b"not read: the import fails first")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "SiglipTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(MissingDependencyError, match="pip install sentencepiece"):
        _open(folder)
