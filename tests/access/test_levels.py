"""For every backbone and level, the handle exposes nothing above its level (DESIGN.md §1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graytune
from graytune import AccessDeniedError, AccessLevel, Op, PortKind
from graytune.types import required_level
from tests.conftest import PACKAGED, sample_inputs

LEVELS = list(AccessLevel)


def edit_tensor(port) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """A small delta (or one token) that fits ``port``: fixed dims kept, free dims 1."""
    shape = [d if isinstance(d, int) else 1 for d in port.shape]
    return (0.01 * torch.randn(shape)).requires_grad_(True)


@pytest.fixture(params=[*PACKAGED, "hf-clip"], scope="module")
def backbone_id(request: pytest.FixtureRequest, tiny_clip_dir) -> str:  # type: ignore[no-untyped-def]
    return f"hf-clip:{tiny_clip_dir}" if request.param == "hf-clip" else request.param


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
                loss = sum(v.pow(2).sum() for k, v in out.items() if k.endswith("embeds"))
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
        handle.forward({"image.pixels": pixels})["image.embeds"].sum().backward()
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
