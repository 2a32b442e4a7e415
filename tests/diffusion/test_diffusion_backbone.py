"""The diffusion backbone through the boundary equals plain diffusers autograd: ``arch:sd-tiny`` and the
``hf-diffusion:`` loader on the same tiny pipeline saved to a folder (no real diffusion weights exist here)."""

from __future__ import annotations

import pytest
import torch

import graytune
from graytune import AccessDeniedError, PortKind
from tests.diffusion import reference
from tests.diffusion.conftest import make_pipeline

TE, PRED = "text.token_embeds", "unet.prediction"
TEXTS = ["a photo of a cat", "the dog"]


def _inputs(seed: int = 0, batch: int = 2, side: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, side, side, generator=g), torch.tensor([10, 731][:batch])


def _weights(shape: torch.Size, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_spec_ports_and_levels() -> None:
    light = graytune.open_backbone("arch:sd-tiny", access="light-gray").spec
    assert light.modalities == ("text", "latents", "image")
    assert light.port("latents.noisy").shape == ("B", 4, "h", "w") == light.port(PRED).shape
    assert light.port("timestep").shape == ("B",) and light.port("timestep").dtype == "int64"
    assert light.port("image.latents").shape == ("B", 4, "H/2", "W/2")
    assert light.port_names(PortKind.OUTPUT) == [PRED, "image.latents"]
    assert light.port_names(PortKind.ENTRY) == ["text.layer.1", "text.prompts.1"]
    assert graytune.open_backbone("arch:sd-tiny", access="dark-gray").spec.port_names(PortKind.ENTRY) == []
    latents = light.preprocess["latents"]
    assert latents["num_train_timesteps"] == 1000 and latents["prediction_type"] == "epsilon"
    assert latents["scheduler"]["class"] == "DDIMScheduler"
    assert latents["scheduler"]["config"]["beta_schedule"] == "scaled_linear"
    assert graytune.BackboneSpec.from_json(light.to_json()) == light
    assert "mechanics only" in light.description


def test_same_id_same_weights_and_fingerprint(diffusion_ids) -> None:  # type: ignore[no-untyped-def]
    first, again = (graytune.open_backbone("arch:sd-tiny") for _ in range(2))
    assert first.fingerprint == again.fingerprint
    latents, t = _inputs()
    inputs = {"text": TEXTS, "latents.noisy": latents, "timestep": t}
    torch.testing.assert_close(first.forward(inputs)[PRED], again.forward(inputs)[PRED], rtol=0, atol=0)
    folder = graytune.open_backbone(diffusion_ids[1])
    assert folder.fingerprint == graytune.open_backbone(diffusion_ids[1]).fingerprint != first.fingerprint


@pytest.mark.parametrize("which", [0, 1], ids=["arch", "folder"])
def test_prediction_equals_the_pipeline(which, diffusion_ids, tiny_parts) -> None:  # type: ignore[no-untyped-def]
    h = graytune.open_backbone(diffusion_ids[which], access="black-box")
    pipe = make_pipeline(tiny_parts)
    tokens = h.tokenize(TEXTS)
    expected_ids = pipe.tokenizer(TEXTS, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
    assert torch.equal(tokens["text.input_ids"], expected_ids) and expected_ids.shape == (2, 77)
    latents, t = _inputs()
    with torch.no_grad():
        prompt_embeds = pipe.encode_prompt(TEXTS, "cpu", 1, False)[0]
        expected = tiny_parts["unet"](latents, t, encoder_hidden_states=prompt_embeds).sample
    got = h.forward({"text": TEXTS, "latents.noisy": latents, "timestep": t})
    assert list(got) == [PRED]
    torch.testing.assert_close(got[PRED], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("which", [0, 1], ids=["arch", "folder"])
def test_vjp_at_token_embeds_add_and_latents(which, diffusion_ids, tiny_parts) -> None:  # type: ignore[no-untyped-def]
    h = graytune.open_backbone(diffusion_ids[which], access="dark-gray")
    tokens = h.tokenize(TEXTS)
    ids, mask = tokens["text.input_ids"], tokens["text.attention_mask"]
    latents, t = _inputs()
    delta = (0.1 * _weights(torch.Size([2, 77, 8]), seed=2)).requires_grad_()
    noisy = latents.clone().requires_grad_()
    got = h.forward({**tokens, "latents.noisy": noisy, "timestep": t}, add={TE: delta})[PRED]
    w = _weights(got.shape)
    g_delta, g_noisy = torch.autograd.grad((got * w).sum(), [delta, noisy])
    ref_delta, ref_noisy = delta.detach().clone().requires_grad_(), latents.clone().requires_grad_()
    expected = reference.predict_with_add(tiny_parts, ids, mask, ref_noisy, t, ref_delta)
    r_delta, r_noisy = torch.autograd.grad((expected * w).sum(), [ref_delta, ref_noisy])
    torch.testing.assert_close(got, expected.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(g_delta, r_delta, rtol=0, atol=1e-5)
    torch.testing.assert_close(g_noisy, r_noisy, rtol=0, atol=1e-5)
    assert float(g_delta[mask == 0].abs().max()) == 0.0  # the add stays off padding


@pytest.mark.parametrize("which", [0, 1], ids=["arch", "folder"])
def test_vjp_at_token_embeds_insert(which, diffusion_ids, tiny_parts) -> None:  # type: ignore[no-untyped-def]
    h = graytune.open_backbone(diffusion_ids[which], access="dark-gray")
    latents, t = _inputs()
    extra = (0.5 * _weights(torch.Size([1, 2, 8]), seed=3)).requires_grad_()
    got = h.forward({"text": TEXTS, "latents.noisy": latents, "timestep": t}, insert={TE: extra})[PRED]
    w = _weights(got.shape)
    (g_extra,) = torch.autograd.grad((got * w).sum(), [extra])
    ref_extra = extra.detach().clone().requires_grad_()
    ids = h.tokenize(TEXTS)["text.input_ids"]
    end_id = int(tiny_parts["tokenizer"].eos_token_id)
    expected = reference.predict_with_insert(tiny_parts, ids, end_id, latents, t, ref_extra)
    (r_extra,) = torch.autograd.grad((expected * w).sum(), [ref_extra])
    torch.testing.assert_close(got, expected.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(g_extra, r_extra, rtol=0, atol=1e-5)
    assert float(g_extra.abs().max()) > 0


def test_vjp_at_text_layer_1(tiny_parts) -> None:  # type: ignore[no-untyped-def]
    h = graytune.open_backbone("arch:sd-tiny", access="light-gray")
    tokens = h.tokenize(TEXTS)
    latents, t = _inputs()
    delta = (0.3 * _weights(torch.Size([1, 1, 8]), seed=4)).requires_grad_()
    got = h.forward({**tokens, "latents.noisy": latents, "timestep": t}, add={"text.layer.1": delta})[PRED]
    w = _weights(got.shape)
    (g_delta,) = torch.autograd.grad((got * w).sum(), [delta])
    ref_delta = delta.detach().clone().requires_grad_()
    expected = reference.predict_with_layer_add(tiny_parts, 1, tokens["text.input_ids"], tokens["text.attention_mask"],
                                                latents, t, ref_delta)
    (r_delta,) = torch.autograd.grad((expected * w).sum(), [ref_delta])
    torch.testing.assert_close(got, expected.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(g_delta, r_delta, rtol=0, atol=1e-5)


def test_prompts_port_takes_tokens_at_light_gray() -> None:
    h = graytune.open_backbone("arch:sd-tiny", access="light-gray")
    latents, t = _inputs()
    prompts = torch.zeros(1, 3, 8, requires_grad=True)
    got = h.forward({"text": TEXTS, "latents.noisy": latents, "timestep": t}, insert={"text.prompts.1": prompts})[PRED]
    (grad,) = torch.autograd.grad(got.square().sum(), [prompts])
    assert got.shape == (2, 4, 8, 8) and float(grad.abs().max()) > 0


def test_vae_encode_is_the_scaled_posterior_mean(diffusion_ids, tiny_parts) -> None:  # type: ignore[no-untyped-def]
    pixels = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(5)) * 2 - 1
    vae = tiny_parts["vae"]
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    for backbone_id in diffusion_ids:
        h = graytune.open_backbone(backbone_id, access="black-box")
        got = h.forward({"image.pixels": pixels})
        assert list(got) == ["image.latents"]
        torch.testing.assert_close(got["image.latents"], expected, rtol=0, atol=1e-6)
    assert expected.shape == (2, 4, 8, 12)


def test_level_contract() -> None:
    latents, t = _inputs()
    inputs = {"text": TEXTS, "latents.noisy": latents, "timestep": t}
    black = graytune.open_backbone("arch:sd-tiny", access="black-box")
    with pytest.raises(AccessDeniedError, match="dark-gray"):
        black.forward(inputs, add={TE: torch.zeros(1, 1, 8, requires_grad=True)})
    with torch.no_grad():  # a black-box edit with no gradient asked (what zeroth-order methods send)
        edited = black.forward(inputs, add={TE: torch.full((1, 1, 8), 0.1)})[PRED]
    dark = graytune.open_backbone("arch:sd-tiny", access="dark-gray")
    torch.testing.assert_close(edited, dark.forward(inputs, add={TE: torch.full((1, 1, 8), 0.1)})[PRED])
    assert black.exposure.black_box_edits["ports"] == {TE: 2}
    for port, group in (("text.layer.1", "add"), ("text.prompts.1", "insert")):
        with pytest.raises(AccessDeniedError, match="light-gray"):
            dark.forward(inputs, **{group: {port: torch.zeros(1, 1, 8, requires_grad=True)}})
    with pytest.raises(AccessDeniedError, match="explicit grant"):
        dark.forward(inputs, reads=[TE])


def test_granted_read_of_token_embeds_is_the_lookup(tiny_parts) -> None:  # type: ignore[no-untyped-def]
    h = graytune.open_backbone("arch:sd-tiny", access="dark-gray", reads=[TE])
    tokens = h.tokenize(TEXTS)
    read = h.forward(tokens, outputs=[], reads=[TE])[TE]
    with torch.no_grad():
        expected = tiny_parts["text_encoder"].embeddings.token_embedding(tokens["text.input_ids"])
    torch.testing.assert_close(read, expected, rtol=0, atol=0)
    assert h.exposure.to_dict()["ports"][TE] == ["read"]


def test_recompute_gives_the_same_vjp_and_bf16_runs() -> None:
    latents, t = _inputs()
    inputs = {"text": TEXTS, "latents.noisy": latents, "timestep": t}
    grads = []
    for recompute in (False, True):
        h = graytune.open_backbone("arch:sd-tiny", access="light-gray", recompute=recompute)
        delta = torch.zeros(1, 1, 8, requires_grad=True)
        out = h.forward(inputs, add={TE: delta, "text.layer.1": delta})[PRED]
        grads.append(torch.autograd.grad(out.square().sum(), [delta])[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)
    half = graytune.open_backbone("arch:sd-tiny", access="dark-gray", dtype="bf16")
    full = graytune.open_backbone("arch:sd-tiny", access="dark-gray").forward(inputs)[PRED]
    low = half.forward(inputs)[PRED]
    assert low.dtype == torch.float32 and torch.nn.functional.cosine_similarity(low.flatten(), full.flatten(), 0) > 0.99
