"""Gradients through the remote boundary equal the in-process ones; training gives the same adapter."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import graytune
from graytune.access import RemoteHandle
from graytune.recipes.evaluate import evaluate_saved
from graytune.recipes.run import RunSpec, train_and_save
from graytune.train.trainer import TrainConfig
from tests.serve.conftest import ALICE

TEXTS = ["a small cat sleeps on the mat", "rain falls on the old roof", "two dogs"]


def _edits(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"shift": (0.05 * torch.randn(1, 1, 384, generator=g)).requires_grad_(),
            "tokens": (0.05 * torch.randn(1, 2, 384, generator=g)).requires_grad_(),
            "inner": (0.05 * torch.randn(3, 1, 384, generator=g)).requires_grad_()}


def _step(handle, edits):  # type: ignore[no-untyped-def]
    out = handle.forward({"text": TEXTS},
                         add={"text.token_embeds": edits["shift"], "text.layer.4": edits["inner"]},
                         insert={"text.token_embeds": edits["tokens"], "text.layer.2": edits["tokens"] * 0.5})
    loss = (out["text.embeds"] ** 2).sum() + out["text.embeds"][:, :7].sum()
    loss.backward()
    return out["text.embeds"].detach(), {k: v.grad for k, v in edits.items()}


def test_gradients_at_input_and_entry_ports_equal_in_process(serve, minilm) -> None:
    url, _ = serve()
    remote = graytune.open_backbone(url, "light-gray", api_key=ALICE)
    assert isinstance(remote, RemoteHandle) and remote.fingerprint == minilm.fingerprint
    z_local, g_local = _step(minilm, _edits(0))
    z_remote, g_remote = _step(remote, _edits(0))
    torch.testing.assert_close(z_remote, z_local, rtol=0, atol=1e-6)
    for name in g_local:
        assert g_local[name].abs().sum() > 0, name
        torch.testing.assert_close(g_remote[name], g_local[name], rtol=1e-5, atol=1e-6)
    assert remote.exposure.gradient_queries == 1
    assert remote.exposure.gradient_samples == remote.stats()["grad_rows_used"] > 0  # the client's count is the server's
    assert remote.stats()["sessions"] == 0  # the VJP consumed its session


def test_gradient_at_an_image_input_port_equals_in_process(serve) -> None:
    local = graytune.open_backbone("efficientnet-lite0", "dark-gray")
    url, _ = serve(handle=local, access="dark-gray", reads=())
    remote = graytune.open_backbone(url, "dark-gray", api_key=ALICE)
    grads = []
    for handle in (local, remote):
        pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        handle.encode_image(pixels).square().sum().backward()
        grads.append(pixels.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_remote_handle_refuses_white_box_and_unknown_ports(serve) -> None:
    url, _ = serve()
    remote = graytune.open_backbone(url, "dark-gray", api_key=ALICE)
    with pytest.raises(graytune.AccessDeniedError, match="never crosses the network"):
        remote.module()
    with pytest.raises(graytune.AccessDeniedError, match="add at text.layer.2 needs access level light-gray"):
        remote.forward({"text": ["a"]}, add={"text.layer.2": torch.zeros(1, 1, 384)})  # as in process (issue 28)
    with pytest.raises(graytune.UnknownNameError, match="text.layer.50"):  # hidden ports are never suggested
        remote.forward({"text": ["a"]}, add={"text.layer.50": torch.zeros(1, 1, 384)})


def test_train_against_a_server_gives_the_same_adapter_as_in_process(serve, tmp_path, monkeypatch) -> None:
    url, _ = serve(access="dark-gray", reads=())
    monkeypatch.setenv("GRAYTUNE_API_KEY", ALICE)
    config = TrainConfig(lr=3e-3, max_steps=6, batch_size=16, seed=3)
    results = {}
    for where, backbone in (("local", "minilm"), ("remote", url)):
        results[where] = train_and_save(RunSpec(backbone, "dark-gray", "dga", "wordnet-supersense",
                                                out=str(tmp_path / where), train=config), progress=False)
    local = load_file(str(tmp_path / "local" / "adapter_model.safetensors"))
    remote = load_file(str(tmp_path / "remote" / "adapter_model.safetensors"))
    assert set(local) == set(remote) and local
    moved = [k for k in local if local[k].abs().sum() > 0]
    assert moved, "training changed no adapter weight"
    for key in local:
        torch.testing.assert_close(remote[key], local[key], rtol=1e-5, atol=1e-6)
    assert results["remote"]["test"] == pytest.approx(results["local"]["test"], abs=1e-6)
    # graytune eval of the locally trained adapter against the server: same fingerprint, same scores
    scored = evaluate_saved(url, str(tmp_path / "local"), "wordnet-supersense")
    assert scored["test"] == pytest.approx(results["local"]["test"], abs=1e-6)
