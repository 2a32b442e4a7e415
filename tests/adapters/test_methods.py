"""One table of methods x a tiny CLIP drives the generic checks (as PEFT's custom-model tests do)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graytune import AccessDeniedError, InvalidInputError, UnknownNameError
from graytune.adapters import build_adapter
from graytune.methods import METHODS, MethodKind
from graytune.model import AdaptedModel
from graytune.recipes.run import open_for
from graytune.types import AccessLevel

#: Every registered method that wraps a handle (logit adapters are tested in tests/transfer).
MODEL_METHODS = sorted(name for name, m in METHODS.items() if m.kind is not MethodKind.LOGIT)

TEXTS = ["a cat", "dogs run far", "a red car", "rain"]


def handle_for(tiny_clip_dir, method: str):  # type: ignore[no-untyped-def]
    level = max(METHODS[method].min_access, AccessLevel.DARK_GRAY)
    return open_for(f"hf-clip:{tiny_clip_dir}", level.label, method)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_method_trains_through_the_boundary_and_changes_only_its_tensors(tiny_clip_dir, method: str) -> None:
    handle = handle_for(tiny_clip_dir, method)
    owner = snapshot(handle._backbone.module())  # test-side introspection of the owner's weights
    model = AdaptedModel.build(handle, method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if METHODS[method].kind is not MethodKind.WHITEBOX:
        assert all(not k.startswith("backbone_module") for k in model.state_dict())
    before = snapshot(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    pixels = torch.randn(4, 3, 32, 32)
    for _ in range(2):
        logits = model.similarity(model.encode_image(pixels), model.encode_text(TEXTS))
        loss = F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after_owner = snapshot(handle._backbone.module())
    assert all(torch.equal(owner[k], after_owner[k]) for k in owner), "the owner's weights changed"
    changed = {k for k, v in snapshot(model).items() if not torch.equal(v, before[k])}
    assert changed <= trainable
    assert changed, "nothing trained"
    if method not in ("zero-shot", "full"):  # full: some weights (e.g. unused poolers) get no gradient
        assert changed == trainable, f"untrained: {sorted(trainable - changed)[:5]}"


IDENTITY = [("dga-pixel", "image", {}), ("dga-pixel", "image", {"depth": 3, "channels": 8, "kernel": 5}),
            ("dga-text", "text", {"extra_tokens": 0}), ("dga-output", "image", {}), ("dga-output", "text", {}),
            ("output-mlp", "text", {}), ("lga", "image", {"mode": "add"}), ("lga", "text", {"mode": "add"}),
            ("adalink", "text", {"rank": 4})]


@pytest.mark.parametrize(("name", "modality", "options"), IDENTITY, ids=[f"{n}-{m}-{len(o)}" for n, m, o in IDENTITY])
def test_identity_at_init(tiny_clip_dir, name: str, modality: str, options: dict) -> None:
    handle = open_for(f"hf-clip:{tiny_clip_dir}", "light-gray", "adalink" if name == "adalink" else "lga")
    model = AdaptedModel(handle, [build_adapter(name, handle.spec, modality, **options)])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        if modality == "image":
            ours, ref = model.encode_image(pixels), handle.encode_image(pixels)
        else:
            ours, ref = model.encode_text(TEXTS[:2]), handle.encode_text(TEXTS[:2])
    torch.testing.assert_close(F.normalize(ours, dim=-1), F.normalize(ref, dim=-1), atol=1e-5, rtol=1e-4)


def test_inserted_tokens_change_outputs_and_start_at_zero(tiny_clip_dir) -> None:
    handle = open_for(f"hf-clip:{tiny_clip_dir}", "light-gray", "dga")
    adapter = build_adapter("dga-text", handle.spec, "text", extra_tokens=2)
    assert adapter.extra is not None and adapter.extra.shape == (1, 2, 32) and not adapter.extra.any()
    with torch.no_grad():
        assert not torch.allclose(AdaptedModel(handle, [adapter]).encode_text(TEXTS), handle.encode_text(TEXTS))


def test_levels_and_grants_are_enforced(tiny_clip_dir) -> None:
    dark = open_for(f"hf-clip:{tiny_clip_dir}", "dark-gray", "lga")
    with pytest.raises(AccessDeniedError, match="method 'lga' needs access level light-gray"):
        AdaptedModel.build(dark, "lga")  # one level check, one exception type, method or adapter
    light = open_for(f"hf-clip:{tiny_clip_dir}", "light-gray", "lga")
    with pytest.raises(AccessDeniedError, match="adapter 'lga'.*light-gray"):
        AdaptedModel(dark, [build_adapter("lga", light.spec, "text")])
    ungranted = open_for(f"hf-clip:{tiny_clip_dir}", "dark-gray", "dga")
    with pytest.raises(AccessDeniedError, match="grant"):
        AdaptedModel(ungranted, [build_adapter("adalink", ungranted.spec, "text")]).encode_text(TEXTS)
    black = open_for(f"hf-clip:{tiny_clip_dir}", "black-box", "output")
    AdaptedModel.build(black, "output").encode_text(TEXTS)  # output adapters need only outputs


def test_bad_names_and_options(tiny_clip_dir) -> None:
    handle = open_for(f"hf-clip:{tiny_clip_dir}", "light-gray", "dga")
    with pytest.raises(UnknownNameError, match="did you mean 'lga'"):
        AdaptedModel.build(handle, "lgaa")
    with pytest.raises(InvalidInputError, match="unknown option.*rnk.*allowed: rank"):
        build_adapter("adalink", handle.spec, "text", rnk=4)
    with pytest.raises(InvalidInputError, match=r"layers \[7\] are not declared.*declared: \[1, 2\]"):
        build_adapter("lga", handle.spec, "text", layers=[7])
    with pytest.raises(UnknownNameError, match="unknown adapter"):
        build_adapter("lora-ish", handle.spec, "text")
    minilm = open_for("minilm", "dark-gray", "dga")
    with pytest.raises(InvalidInputError, match="has only text"):
        build_adapter("dga-pixel", minilm.spec, "image")
