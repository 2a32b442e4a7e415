"""Device, dtype and owner-side recomputation, end to end on CPU (bf16 runs on CPU).

The GPU cases (client and owner on one CUDA device, a CPU client of a GPU backbone)
are in ``tests/access/test_gpu.py``, marked ``gpu``: ``make test-gpu`` runs them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graytune
from graytune import InvalidInputError, NumericalError
from graytune.devices import parse_device, parse_dtype
from graytune.model import AdaptedModel

TEXTS = ["a small cat sleeps on the mat", "rain falls on the old roof of the barn", "two dogs"]


def _text_step(handle, shift=None):  # type: ignore[no-untyped-def]
    """The embeddings and the VJP at a token-embedding shift for a fixed loss."""
    shift = (0.05 * torch.ones(1, 1, handle.spec.port("text.token_embeds").shape[-1])) if shift is None else shift
    shift = shift.clone().requires_grad_(True)
    z = handle.forward({"text": TEXTS}, add={"text.token_embeds": shift}, outputs=["text.embeds"])["text.embeds"]
    ((z ** 2).sum() + z[:, :5].sum()).backward()
    return z.detach(), shift.grad


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_dtype_names_and_devices_are_parsed_with_clear_errors() -> None:
    assert parse_dtype("bf16") is parse_dtype("bfloat16") is parse_dtype(torch.bfloat16) is torch.bfloat16
    assert parse_dtype("fp16") is torch.float16 and parse_dtype(None) is torch.float32
    with pytest.raises(InvalidInputError, match="unknown dtype 'int8'.*bf16"):
        parse_dtype("int8")
    with pytest.raises(InvalidInputError, match="not supported for a backbone"):
        parse_dtype(torch.float64)
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InvalidInputError, match="unknown device 'gpu0'"):
        parse_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="no CUDA device.*--device cpu"):
            graytune.open_backbone("minilm", device="cuda")


def test_bf16_owner_gives_float32_results_close_to_fp32() -> None:
    fp32 = graytune.open_backbone("minilm", device="cpu")
    bf16 = graytune.open_backbone("minilm", device="cpu", dtype="bf16")
    assert (bf16.device, bf16.dtype) == (torch.device("cpu"), torch.bfloat16)
    z32, g32 = _text_step(fp32)
    z16, g16 = _text_step(bf16)
    assert z16.dtype == g16.dtype == torch.float32  # the client never sees half precision
    assert _cos(z16, z32) > 0.999
    assert _cos(g16, g32) > 0.99  # the target for bf16 VJPs
    assert not torch.equal(z16, z32)  # it really ran in bf16


def test_a_half_precision_owner_leaves_the_shared_fp32_backbone_alone() -> None:
    bf16 = graytune.open_backbone("minilm", dtype="bf16")
    white = graytune.open_backbone("minilm", access="white-box")
    assert next(white.module().parameters()).dtype == torch.float32
    assert next(graytune.open_backbone("minilm", access="white-box", dtype="bf16").module().parameters()).dtype \
        == torch.bfloat16
    assert bf16.dtype == torch.bfloat16


def test_adapters_stay_float32_around_a_bf16_backbone() -> None:
    handle = graytune.open_backbone("minilm", dtype="bf16")
    model = AdaptedModel.build(handle, "dga")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    loss = model.encode_text(TEXTS).pow(2).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads)


def test_recompute_is_exact_and_holds_less(tiny_clip_dir) -> None:  # type: ignore[no-untyped-def]
    for backbone in ("minilm", f"hf-clip:{tiny_clip_dir}"):
        plain = graytune.open_backbone(backbone, device="cpu")
        again = graytune.open_backbone(backbone, device="cpu", recompute=True)
        z1, g1 = _text_step(plain)
        z2, g2 = _text_step(again)
        torch.testing.assert_close(z2, z1, rtol=0, atol=0)
        torch.testing.assert_close(g2, g1, rtol=0, atol=0)

    def held(handle) -> int:  # type: ignore[no-untyped-def]
        shift = torch.zeros(1, 1, 384, requires_grad=True)
        plan = handle.plan({"text": TEXTS * 4}, {"text.token_embeds": shift}, {}, None, [])
        call = handle.open_call(plan, measure=True)
        call.forward([shift])
        return call.nbytes

    full, kept = held(graytune.open_backbone("minilm")), held(graytune.open_backbone("minilm", recompute=True))
    assert 0 < kept < 0.3 * full  # only the layers' inputs wait for the VJP


def test_recompute_under_full_fine_tuning_gives_the_same_weight_gradients() -> None:
    grads = []
    for recompute in (False, True):
        handle = graytune.open_backbone("minilm", access="white-box", recompute=recompute)
        model = AdaptedModel.build(handle, "full")
        model.encode_text(TEXTS).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_fp16_overflow_is_reported_as_the_owners_precision(tiny_clip_dir) -> None:  # type: ignore[no-untyped-def]
    handle = graytune.open_backbone(f"hf-clip:{tiny_clip_dir}", dtype="fp16")
    pixels = torch.full((1, 3, 32, 32), 1e5)  # finite in float32, beyond fp16's 65504
    with pytest.raises(NumericalError, match=r"in fp16 gave NaN or infinite values at image.embeds.*bf16"):
        handle.encode_image(pixels)
    assert torch.isfinite(handle.encode_image(torch.randn(1, 3, 32, 32))).all()  # ordinary inputs are fine


def test_fp16_vjps_of_tiny_gradients_do_not_flush_to_zero() -> None:
    handle32, handle16 = graytune.open_backbone("minilm"), graytune.open_backbone("minilm", dtype="fp16")
    grads = []
    for handle in (handle32, handle16):
        shift = torch.zeros(1, 1, 384, requires_grad=True)
        z = handle.forward({"text": TEXTS}, add={"text.token_embeds": shift})["text.embeds"]
        (1e-9 * z.sum()).backward()  # fp16's smallest subnormal is 6e-8: unscaled, this VJP would be 0
        grads.append(shift.grad)
    assert grads[1].abs().max() > 0 and _cos(grads[1], grads[0]) > 0.99
