"""On a CUDA device: owner and client share it in process, a CPU client uses a GPU backbone, bf16 is close.

Marked ``gpu``; skipped where no CUDA device exists (``make test-gpu`` runs them with the reason shown).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graytune
from graytune.model import AdaptedModel

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TEXTS = ["a small cat sleeps on the mat", "rain falls on the old roof of the barn", "two dogs"]


def _vjp(handle, device: str):  # type: ignore[no-untyped-def]
    shift = torch.full((1, 1, 384), 0.05, device=device, requires_grad=True)
    z = handle.forward({"text": TEXTS}, add={"text.token_embeds": shift})["text.embeds"]
    ((z ** 2).sum() + z[:, :5].sum()).backward()
    return z, shift.grad


def test_by_default_an_in_process_backbone_and_its_adapters_share_the_gpu() -> None:
    handle = graytune.open_backbone("minilm")
    assert handle.device.type == "cuda"
    model = AdaptedModel.build(handle, "dga")
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in model.parameters())
    z = model.encode_text(TEXTS)
    assert z.device.type == "cuda"
    z.sum().backward()
    assert all(p.grad.device.type == "cuda" for p in model.parameters() if p.grad is not None)


def test_a_cpu_client_gets_cpu_results_and_vjps_from_a_gpu_backbone() -> None:
    gpu = graytune.open_backbone("minilm", device="cuda")
    cpu = graytune.open_backbone("minilm", device="cpu")
    z_gpu, g_gpu = _vjp(gpu, "cpu")
    z_cpu, g_cpu = _vjp(cpu, "cpu")
    assert z_gpu.device.type == g_gpu.device.type == "cpu"
    torch.testing.assert_close(z_gpu, z_cpu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-3, atol=1e-5)


def test_bf16_on_gpu_is_close_to_fp32_and_recompute_is_exact() -> None:
    fp32 = graytune.open_backbone("minilm", device="cuda")
    z32, g32 = _vjp(fp32, "cuda")
    z16, g16 = _vjp(graytune.open_backbone("minilm", device="cuda", dtype="bf16"), "cuda")
    assert z16.dtype == g16.dtype == torch.float32
    assert float(F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)) > 0.99
    zr, gr = _vjp(graytune.open_backbone("minilm", device="cuda", recompute=True), "cuda")
    torch.testing.assert_close(zr, z32, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gr, g32, rtol=1e-4, atol=1e-6)
