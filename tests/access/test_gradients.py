"""Gradients that cross the boundary equal plain autograd through the same frozen module.

References are written independently of graytune's own forward code: the
library's public model calls (transformers, efficientnet-lite-pytorch), with
entry-port edits made by forward pre-hooks on the white-box module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import graytune

ATOL, RTOL = 1e-5, 1e-4


def test_minilm_token_embeds_and_entry_grads_match_plain_autograd() -> None:
    handle = graytune.open_backbone("minilm", access="light-gray")
    bert = graytune.open_backbone("minilm", access="white-box").module()
    tokens = handle.tokenize(["a man plays a guitar.", "the stock market fell sharply today"])
    ids, mask = tokens["text.input_ids"], tokens["text.attention_mask"]
    torch.manual_seed(0)
    shift = (0.05 * torch.randn(1, 1, 384)).requires_grad_(True)
    entry = (0.05 * torch.randn(1, 1, 384)).requires_grad_(True)
    target = torch.randn(2, 384)

    z = handle.forward(tokens, add={"text.token_embeds": shift, "text.layer.3": entry})["text.embeds"]
    F.mse_loss(z, target).backward()

    shift_ref, entry_ref = shift.detach().clone().requires_grad_(True), entry.detach().clone().requires_grad_(True)
    m = mask.unsqueeze(-1).float()
    hook = bert.encoder.layer[3].register_forward_pre_hook(
        lambda _mod, args: (args[0] + entry_ref * m, *args[1:]))
    embeds = bert.embeddings.word_embeddings(ids) + shift_ref * m
    hidden = bert(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    hook.remove()
    z_ref = (hidden * m).sum(1) / m.sum(1)
    F.mse_loss(z_ref, target).backward()

    torch.testing.assert_close(z, z_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(shift.grad, shift_ref.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(entry.grad, entry_ref.grad, atol=ATOL, rtol=RTOL)
    assert handle.exposure.gradient_queries == 1


def test_efficientnet_pixel_and_entry_grads_match_plain_autograd() -> None:
    handle = graytune.open_backbone("efficientnet-lite0", access="light-gray")
    model = graytune.open_backbone("efficientnet-lite0", access="white-box").module()
    entry_port = handle.spec.port_names(graytune.PortKind.ENTRY)[2]
    block = int(entry_port.rsplit(".", 1)[1])
    channels = handle.spec.port(entry_port).shape[1]
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 96, 96, requires_grad=True)
    delta = (0.1 * torch.randn(1, channels, 1, 1)).requires_grad_(True)
    labels = torch.tensor([3, 500])

    logits = handle.forward({"image.pixels": pixels}, add={entry_port: delta}, outputs=["logits"])["logits"]
    F.cross_entropy(logits, labels).backward()

    pixels_ref = pixels.detach().clone().requires_grad_(True)
    delta_ref = delta.detach().clone().requires_grad_(True)
    hook = model._blocks[block].register_forward_pre_hook(lambda _m, args: (args[0] + delta_ref, *args[1:]))
    logits_ref = model(pixels_ref)
    hook.remove()
    F.cross_entropy(logits_ref, labels).backward()

    torch.testing.assert_close(logits, logits_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(pixels.grad, pixels_ref.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(delta.grad, delta_ref.grad, atol=ATOL, rtol=RTOL)


def test_tiny_clip_grads_match_plain_autograd(tiny_clip_dir) -> None:  # type: ignore[no-untyped-def]
    bid = f"hf-clip:{tiny_clip_dir}"
    handle = graytune.open_backbone(bid, access="light-gray")
    clip = graytune.open_backbone(bid, access="white-box").module()
    tokens = handle.tokenize(["a cat", "dogs run far"])
    ids, mask = tokens["text.input_ids"], tokens["text.attention_mask"]
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32, requires_grad=True)
    entry = (0.1 * torch.randn(1, 1, 32)).requires_grad_(True)

    out = handle.forward({"image.pixels": pixels, **tokens}, add={"image.layer.2": entry})
    loss = (F.normalize(out["image.embeds"], dim=-1) * F.normalize(out["text.embeds"], dim=-1)).sum()
    loss.backward()

    pixels_ref, entry_ref = pixels.detach().clone().requires_grad_(True), entry.detach().clone().requires_grad_(True)
    hook = clip.vision_model.encoder.layers[2].register_forward_pre_hook(
        lambda _m, args: (args[0] + entry_ref, *args[1:]))
    img = clip.get_image_features(pixel_values=pixels_ref).pooler_output
    hook.remove()
    txt = clip.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum().backward()

    torch.testing.assert_close(out["image.embeds"], img, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out["text.embeds"], txt, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(pixels.grad, pixels_ref.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(entry.grad, entry_ref.grad, atol=ATOL, rtol=RTOL)


def test_inserted_tokens_grads_match_the_uncrossed_forward(tiny_clip_dir) -> None:  # type: ignore[no-untyped-def]
    """Insert has no public-library twin: compare with the same owner code run without the crossing."""
    from graytune.backbones import load_backbone

    for bid, dim in (("minilm", 384), (f"hf-clip:{tiny_clip_dir}", 32)):
        handle = graytune.open_backbone(bid, access="light-gray")
        tokens = handle.tokenize(["a cat", "dogs run far away"])
        torch.manual_seed(1)
        extra = torch.randn(1, 2, dim, requires_grad=True)
        deep = torch.randn(2, 1, dim, requires_grad=True)
        z = handle.forward(tokens, insert={"text.token_embeds": extra, "text.layer.2": deep})["text.embeds"]
        z.pow(2).sum().backward()

        extra_ref, deep_ref = extra.detach().clone().requires_grad_(True), deep.detach().clone().requires_grad_(True)
        ref = load_backbone(bid).run(dict(tokens), {}, {"text.token_embeds": extra_ref, "text.layer.2": deep_ref},
                                     ["text.embeds"], [])["text.embeds"]
        ref.pow(2).sum().backward()
        plain = handle.forward(tokens)["text.embeds"]
        assert not torch.allclose(z, plain, atol=1e-3), "inserted tokens must change the pooled embedding"
        torch.testing.assert_close(z, ref, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(extra.grad, extra_ref.grad, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(deep.grad, deep_ref.grad, atol=ATOL, rtol=RTOL)


def test_padding_does_not_change_a_row_with_edits() -> None:
    """The shift stays off padding and inserted tokens sit after [CLS]: a row is the same alone or padded."""
    handle = graytune.open_backbone("minilm", access="dark-gray")
    shift, extra = 0.1 * torch.ones(1, 1, 384), 0.1 * torch.ones(1, 1, 384)
    edits = {"add": {"text.token_embeds": shift}, "insert": {"text.token_embeds": extra}}
    alone = handle.forward({"text": ["a cat"]}, **edits)["text.embeds"]
    padded = handle.forward({"text": ["a cat", "a much longer sentence about many things"]}, **edits)["text.embeds"]
    torch.testing.assert_close(alone[0], padded[0], atol=1e-5, rtol=1e-4)
