"""The methods as published: AdaLink per input modality, and DGA/LGA variants that are the identity at init."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from graytune import InvalidInputError
from graytune.adapters import build_adapter
from graytune.model import AdaptedModel
from graytune.recipes.run import open_for
from tests.backbones.tiny_text_vision import build_tiny_bert

TEXTS = ["a cat", "dogs run far", "a red car", "rain"]
TOKENS = {"image": "image.patch_embeds", "text": "text.token_embeds"}


def test_adalink_adapts_both_towers_of_a_clip_with_its_grants_and_nothing_at_the_outputs(tiny_clip_dir) -> None:
    handle = open_for(f"hf-clip:{tiny_clip_dir}", None, "adalink")
    assert handle.grants == set(TOKENS.values())  # the grants it needs, and no other
    model = AdaptedModel.build(handle, "adalink")
    assert [(a.name, a.modality) for a in [*model.image_adapters, *model.text_adapters]] == \
        [("adalink", "image"), ("adalink", "text")]
    logits = model.similarity(model.encode_image(torch.randn(4, 3, 32, 32)), model.encode_text(TEXTS))
    F.cross_entropy(logits, torch.arange(4)).backward()
    for adapter in [*model.image_adapters, *model.text_adapters]:
        assert adapter.up.weight.grad is not None and adapter.up.weight.grad.abs().sum() > 0, adapter.modality
    used = handle.exposure.to_dict()["ports"]
    assert {port for port, ops in used.items() if "read" in ops and not port.endswith(".embeds")} == set(TOKENS.values())
    assert {port for port, ops in used.items() if "add" in ops} == set(TOKENS.values())
    assert not any("insert" in ops for ops in used.values())
    assert not any(port.split(".")[1].startswith("layer") for port in used)


def test_adalink_refuses_an_image_tower_without_patch_tokens_and_leaves_it_as_it_is(tiny_loader_ids) -> None:
    siglip = tiny_loader_ids["hf-siglip"]
    handle = open_for(siglip, None, "adalink")
    assert handle.grants == {"text.token_embeds"}
    with pytest.raises(InvalidInputError, match=r"no input-token port \(image.patch_embeds\).*adalink\+output"):
        build_adapter("adalink", handle.spec, "image")
    model = AdaptedModel.build(handle, "adalink")
    assert [a.modality for a in model.image_adapters] == [] and [a.name for a in model.text_adapters] == ["adalink"]


def test_an_artifact_saved_as_the_old_adalink_loads_as_adalink_plus_output(tiny_clip_dir, tmp_path) -> None:
    handle = open_for(f"hf-clip:{tiny_clip_dir}", None, "adalink+output")
    model = AdaptedModel.build(handle, "adalink+output")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        ref = model.encode_text(TEXTS)
    folder = model.save_pretrained(tmp_path / "old")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "method": "adalink"}))  # as written before
    loaded = AdaptedModel.from_pretrained(folder, open_for(f"hf-clip:{tiny_clip_dir}", None, "adalink"))
    assert loaded.method == "adalink+output"
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(TEXTS), ref, rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:  # type: ignore[no-untyped-def]
    return f"hf-text:{build_tiny_bert(tmp_path_factory.mktemp('bert'))}"  # mean pooling, as MiniLM


@pytest.mark.parametrize("method", ["dga-id", "lga-id"])
@pytest.mark.parametrize("backbone", ["bert", "clip"])
def test_gated_variants_are_exactly_zero_shot_at_init_and_their_gates_learn(tiny_bert, tiny_clip_dir, method: str,
                                                                           backbone: str) -> None:
    backbone_id = tiny_bert if backbone == "bert" else f"hf-clip:{tiny_clip_dir}"
    handle = open_for(backbone_id, None, method)
    gated, current = AdaptedModel.build(handle, method), AdaptedModel.build(handle, method.removesuffix("-id"))
    with torch.no_grad():
        zero_shot = handle.encode_text(TEXTS)
        torch.testing.assert_close(gated.encode_text(TEXTS), zero_shot, rtol=0, atol=1e-6)
        assert not torch.allclose(current.encode_text(TEXTS), zero_shot, atol=1e-3)  # today's defaults are not
    gates = [a.gate for a in gated.text_adapters if getattr(a, "gate", None) is not None]
    assert len(gates) == (1 if method == "dga-id" else 2)
    F.normalize(gated.encode_text(TEXTS), dim=-1).sum(0).square().sum().backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)


def test_a_channel_gate_and_the_option_checks(tiny_bert) -> None:
    handle = open_for(tiny_bert, "light-gray", "lga")
    adapter = build_adapter("lga", handle.spec, "text", gate="channel")
    assert adapter.gate is not None and adapter.gate.shape == (handle.spec.port("text.embeds").shape[1],)
    assert build_adapter("lga", handle.spec, "text", gate="scalar", mode="add").gate is None  # offsets need none
    with pytest.raises(InvalidInputError, match="gate must be one of none, scalar, channel"):
        build_adapter("dga-text", handle.spec, "text", gate="sigmoid")
    with pytest.raises(InvalidInputError, match="gate and zeroth_order"):
        build_adapter("dga-text", handle.spec, "text", gate="scalar", zeroth_order=True)


def test_a_served_host_batches_gated_adapters_and_matches_them_one_by_one(tiny_bert, tmp_path) -> None:
    from graytune.serve.adapters import AdapterHost, _Job

    handle = open_for(tiny_bert, None, "lga-id")
    folders = {}
    for seed, method in enumerate(["dga-id", "dga-id", "dga"]):
        model = AdaptedModel.build(handle, method)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        folders[f"{method}-{seed}"] = str(model.save_pretrained(tmp_path / str(seed)))
    host = AdapterHost(handle, folders, window_ms=1)
    try:
        jobs = [_Job(host.model(name), "text", texts=TEXTS[:2]) for name in folders]
        with torch.no_grad():
            host.run(jobs)
        assert host.backbone_calls == 3  # the two gated adapters share both of their calls; dga has its own
        for name, job in zip(folders, jobs):
            with torch.no_grad():
                torch.testing.assert_close(job.future.result(), host.model(name).encode_text(TEXTS[:2]),
                                           rtol=1e-4, atol=1e-5)
    finally:
        host.close()
