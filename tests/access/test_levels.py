"""For every backbone and level, the handle exposes nothing above its level (DESIGN.md §1)."""

from __future__ import annotations

import httpx
import pytest
import torch
from torch import nn

import graytune
from graytune import AccessDeniedError, AccessLevel, Op, PortKind
from graytune.access.wire import pack_call
from graytune.types import required_level
from tests.conftest import PACKAGED, sample_inputs
from tests.serve.conftest import ALICE, minilm, serve  # noqa: F401 - fixtures for the served test

LEVELS = list(AccessLevel)


def readout(values: torch.Tensor) -> torch.Tensor:
    """A fixed random linear read-out: the sum or squared norm of a layer-normalised embedding is constant,
    so its gradient would be zero whatever reached it."""
    weights = torch.randn(values.shape, generator=torch.Generator().manual_seed(1))
    return (values * weights).sum()


def edit_tensor(port) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """A small delta (or one token) that fits ``port``: fixed dims kept, free dims 1."""
    shape = [d if isinstance(d, int) else 1 for d in port.shape]
    return (0.01 * torch.randn(shape)).requires_grad_(True)


@pytest.fixture(params=[*PACKAGED, "hf-clip", "hf-siglip", "hf-text", "hf-vision"], scope="module")
def backbone_id(request: pytest.FixtureRequest, tiny_clip_dir, tiny_loader_ids) -> str:  # type: ignore[no-untyped-def]
    if request.param == "hf-clip":
        return f"hf-clip:{tiny_clip_dir}"
    return tiny_loader_ids.get(request.param, request.param)


@pytest.mark.parametrize("level", LEVELS, ids=[lvl.label for lvl in LEVELS])
def test_every_port_and_op_is_allowed_exactly_from_its_level(backbone_id: str, level: AccessLevel) -> None:
    handle = graytune.open_backbone(backbone_id, access=level)
    full = graytune.open_backbone(backbone_id, access="white-box").spec
    assert not isinstance(handle, nn.Module)
    assert not hasattr(handle, "parameters") and not hasattr(handle, "state_dict")
    tried = 0
    for port in full.ports:
        for op in port.ops:
            if op in (Op.REPLACE, Op.READ):
                continue  # replace is the plain input path; reads are grants (tested below)
            tried += 1
            needed = required_level(port.kind, op, with_grad=True)
            inputs = sample_inputs(full)
            delta = edit_tensor(port)
            call = lambda: handle.forward(inputs, **{op.value: {port.name: delta}})  # noqa: E731
            if level < needed:
                with pytest.raises(AccessDeniedError) as err:
                    call()
                assert needed.label in str(err.value) and level.label in str(err.value)
            else:
                out = call()
                loss = sum(readout(v) for k, v in out.items() if k.endswith("embeds"))
                loss.backward()
                assert delta.grad is not None and torch.isfinite(delta.grad).all()
                assert delta.grad.abs().sum() > 0, f"no gradient reached {op.value} at {port.name}"
    assert tried > 0


@pytest.mark.parametrize("level", LEVELS, ids=[lvl.label for lvl in LEVELS])
def test_gradients_at_inputs_need_dark_gray(backbone_id: str, level: AccessLevel) -> None:
    handle = graytune.open_backbone(backbone_id, access=level)
    inputs = sample_inputs(handle.spec)
    plain = handle.forward(inputs)  # forward on raw inputs works at every level
    assert all(not v.requires_grad for v in plain.values())
    if "image.pixels" not in inputs:
        return
    pixels = inputs["image.pixels"].clone().requires_grad_(True)
    if level < AccessLevel.DARK_GRAY:
        with pytest.raises(AccessDeniedError, match="dark-gray"):
            handle.forward({"image.pixels": pixels})
    else:
        readout(handle.forward({"image.pixels": pixels})["image.embeds"]).backward()
        assert pixels.grad is not None and pixels.grad.abs().sum() > 0


@pytest.mark.parametrize("level", LEVELS, ids=[lvl.label for lvl in LEVELS])
def test_spec_shows_entry_ports_only_from_light_gray(backbone_id: str, level: AccessLevel) -> None:
    spec = graytune.open_backbone(backbone_id, access=level).spec
    entries = spec.port_names(PortKind.ENTRY)
    assert bool(entries) == (level >= AccessLevel.LIGHT_GRAY)
    assert spec.fingerprint == graytune.open_backbone(backbone_id, access="black-box").spec.fingerprint


@pytest.mark.parametrize("level", LEVELS, ids=[lvl.label for lvl in LEVELS])
def test_module_only_at_white_box_and_as_a_copy(backbone_id: str, level: AccessLevel) -> None:
    handle = graytune.open_backbone(backbone_id, access=level)
    if level < AccessLevel.WHITE_BOX:
        with pytest.raises(AccessDeniedError, match="white-box"):
            handle.module()
        return
    module = handle.module()
    assert isinstance(module, nn.Module)
    with torch.no_grad():
        next(module.parameters()).add_(1.0)  # a baseline editing its copy...
    again = handle.module()
    assert not torch.equal(next(module.parameters()), next(again.parameters()))  # ...leaves the owner's intact


def test_reads_need_an_explicit_grant() -> None:
    handle = graytune.open_backbone("minilm", access="light-gray")
    with pytest.raises(AccessDeniedError, match="grant"):
        handle.forward({"text": ["a cat"]}, reads=["text.token_embeds"])
    granted = graytune.open_backbone("minilm", access="dark-gray", reads=["text.token_embeds"])
    out = granted.forward({"text": ["a cat"]}, reads=["text.token_embeds"])
    assert out["text.token_embeds"].shape[-1] == 384 and not out["text.token_embeds"].requires_grad
    assert granted.exposure.to_dict()["ports"]["text.token_embeds"] == ["read"]
    with pytest.raises(AccessDeniedError, match="light-gray"):
        graytune.open_backbone("minilm", access="dark-gray", reads=["text.layer.2"])


def _input_edits(spec) -> list[tuple[Op, str]]:  # type: ignore[no-untyped-def]
    """Every (add or insert, input port) a spec allows."""
    return [(op, p.name) for p in spec.ports if p.kind is PortKind.INPUT for op in p.ops if op in (Op.ADD, Op.INSERT)]


def test_black_box_adds_and_inserts_at_input_ports_without_gradients(backbone_id: str) -> None:
    """DESIGN.md §1: what zeroth-order input tuning sends; a gradient there still needs dark-gray."""
    handle = graytune.open_backbone(backbone_id, access="black-box")
    edits = _input_edits(handle.spec)
    if not edits:
        pytest.skip(f"{backbone_id} has no add/insert input port")
    for op, name in edits:
        inputs = sample_inputs(handle.spec)
        delta = edit_tensor(handle.spec.port(name)).detach()  # no gradient asked
        plain = handle.forward(inputs)
        edited = handle.forward(inputs, **{op.value: {name: delta}})
        assert all(not v.requires_grad for v in edited.values())
        assert any(not torch.equal(plain[k], edited[k]) for k in edited), f"{op.value} at {name} changed nothing"
        with torch.no_grad():  # grad mode off: a tensor that requires grad asks for none either
            handle.forward(inputs, **{op.value: {name: delta.clone().requires_grad_(True)}})
        with pytest.raises(AccessDeniedError) as err:
            handle.forward(inputs, **{op.value: {name: delta.clone().requires_grad_(True)}})
        assert "dark-gray" in str(err.value) and "black-box" in str(err.value)
    assert handle.exposure.gradient_queries == 0
    entry = next((p for p in graytune.open_backbone(backbone_id, "white-box").spec.ports if p.kind is PortKind.ENTRY
                  and Op.ADD in p.ops), None)
    if entry is not None:  # entry ports stay light-gray, gradient or not
        dark = graytune.open_backbone(backbone_id, access="dark-gray")
        with pytest.raises(AccessDeniedError, match="light-gray"):
            dark.forward(sample_inputs(dark.spec), add={entry.name: edit_tensor(entry).detach()})


def test_black_box_input_edits_against_a_server(serve) -> None:  # type: ignore[no-untyped-def]
    url, app = serve(access="black-box", reads=())
    remote = graytune.open_backbone(url, access="black-box", api_key=ALICE)
    local = graytune.open_backbone("minilm", access="black-box")
    shift, extra = 0.05 * torch.randn(1, 1, 384), 0.05 * torch.randn(1, 2, 384)
    edits = {"add": {"text.token_embeds": shift}, "insert": {"text.token_embeds": extra}}
    texts = ["a small cat sleeps.", "rain on the roof!"]
    got = remote.forward({"text": texts}, **edits)["text.embeds"]
    torch.testing.assert_close(got, local.forward({"text": texts}, **edits)["text.embeds"], atol=1e-5, rtol=1e-4)
    with pytest.raises(AccessDeniedError, match="dark-gray"):
        remote.forward({"text": texts}, add={"text.token_embeds": shift.clone().requires_grad_(True)})
    # the server checks on its own: a request asking a gradient at the token embeddings gets 403
    plan = graytune.open_backbone("minilm", access="dark-gray").check(
        {"text": texts}, add={"text.token_embeds": shift.clone().requires_grad_(True)})
    answer = httpx.post(f"{url}/v1/forward", content=pack_call(plan, "black-box"),
                        headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)
    assert answer.status_code == 403 and "dark-gray" in answer.text
    stats = remote.stats()
    assert stats["sessions"] == 0 and stats["grad_rows_used"] == 0 and remote.exposure.gradient_queries == 0
