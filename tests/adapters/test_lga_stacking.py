"""LGA's stacking: ``accumulate`` (tokens of every layer join the sequence) and ``replace`` (VPT-deep, through the
``<m>.prompts.k`` ports: each layer's tokens take the places of the previous layer's)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import graytune
from graytune import InvalidInputError
from graytune.adapters import build_adapter
from graytune.methods import METHODS
from graytune.backbones.loading import file_identity
from graytune.model import AdaptedModel
from graytune.recipes.run import open_for
from graytune.types import AccessLevel, BackboneSpec, Op, PortKind, PortSpec, is_prompts_port
from tests.backbones.tiny_siglip import build_tiny_siglip
from tests.backbones.tiny_text_vision import _sizes, bert_tokenizer, build_tiny_vit, write_sentence_transformers

TEXTS = ["a cat", "dogs run far away", "a red car", "rain"]
K = 2


def _tokens(k: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(1, k, dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def deep_bert(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """A tiny random 4-layer BERT with mean pooling (entry layers 1, 2, 3), as MiniLM."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert4")
    tokenizer = bert_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=40, pad_token_id=0,
                        **{**_sizes(), "num_hidden_layers": 4})
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_sentence_transformers(folder, "mean")
    return folder


@pytest.fixture(scope="module")
def tiny_siglip_dir(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    return build_tiny_siglip(tmp_path_factory.mktemp("siglip"))


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    return build_tiny_vit(tmp_path_factory.mktemp("vit"))


def test_replace_keeps_the_sequence_at_l_plus_k_where_accumulate_grows_by_k_per_layer(deep_bert) -> None:
    handle = graytune.open_backbone(f"hf-text:{deep_bert}", "light-gray", reads=["text.layer.3"])
    ids = handle.tokenize(TEXTS)
    width = ids["text.input_ids"].shape[1]
    first, second = _tokens(K, 32, 0), _tokens(K, 32, 1)
    with torch.no_grad():
        deep = handle.forward(ids, insert={"text.prompts.1": first, "text.prompts.2": second}, reads=["text.layer.3"])
        grown = handle.forward(ids, insert={"text.layer.1": first, "text.layer.2": second}, reads=["text.layer.3"])
    assert deep["text.layer.3"].shape[1] == width + K
    assert grown["text.layer.3"].shape[1] == width + 2 * K


def _rows_at(ids: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    """``[B]`` where an insert at a text layer goes: after [CLS], before the end token, before the last position."""
    ids_, mask = ids["text.input_ids"], ids["text.attention_mask"]
    if where == "first":
        return torch.ones(len(ids_), dtype=torch.long)
    if where == "end":  # right padding: the end token is the last real one
        return mask.sum(1) - 1
    return torch.full((len(ids_),), ids_.shape[1] - 1, dtype=torch.long)


def _check_prompts(handle, inputs, modality: str, before: dict, layer: int, at: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    """Tokens sent to ``<m>.prompts.<layer>`` after ``before`` (one earlier prompts port, perhaps plain inserts)
    sit at positions ``at[b]..at[b]+K-1`` entering that layer, written over the block and nothing else."""
    out, entry = f"{modality}.embeds", f"{modality}.layer.{layer}"
    tokens = _tokens(K, handle.spec.port(entry).shape[-1], 7)
    plain = {name.replace(".prompts.", ".layer."): t for name, t in before.items()}
    with torch.no_grad():
        # the first prompts port inserts exactly as an insert at its layer would
        torch.testing.assert_close(handle.forward(inputs, insert=before, outputs=[out])[out],
                                   handle.forward(inputs, insert=plain, outputs=[out])[out], rtol=0, atol=0)
        got = handle.forward(inputs, insert={**before, f"{modality}.prompts.{layer}": tokens}, outputs=[out],
                             reads=[entry])
        hidden = got[entry]  # [B, L+K..., D] entering the layer, before its edits
        rows = torch.arange(len(hidden)).unsqueeze(1)  # [B, 1]
        slots = at.unsqueeze(1) + torch.arange(K)  # [B, K]
        block = torch.zeros(hidden.shape[:2], dtype=torch.bool)
        block[rows, slots] = True
        # what the overwrite does, as a per-position add that turns the block into the tokens
        target = hidden.clone()
        target[rows, slots] = tokens.expand(len(hidden), -1, -1)
        as_add = handle.forward(inputs, add={entry: target - hidden}, insert=plain, outputs=[out])[out]
        torch.testing.assert_close(got[out], as_add, rtol=1e-5, atol=1e-5)
        # whatever arrives at the block is discarded; the same change elsewhere, or without the overwrite, is not
        noise = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(3))
        on_block = noise * block.unsqueeze(-1)
        insert = {**before, f"{modality}.prompts.{layer}": tokens}
        torch.testing.assert_close(handle.forward(inputs, add={entry: on_block}, insert=insert, outputs=[out])[out],
                                   got[out], rtol=0, atol=0)
        assert not torch.allclose(handle.forward(inputs, add={entry: on_block}, insert=before, outputs=[out])[out],
                                  handle.forward(inputs, insert=before, outputs=[out])[out], atol=1e-4)
        off_block = noise * (~block).unsqueeze(-1)
        assert not torch.allclose(handle.forward(inputs, add={entry: off_block}, insert=insert, outputs=[out])[out],
                                  got[out], atol=1e-4)


def test_later_prompts_write_over_the_block_the_first_placed_even_past_plain_inserts(deep_bert) -> None:
    handle = graytune.open_backbone(f"hf-text:{deep_bert}", "light-gray", reads=["text.layer.2", "text.layer.3"])
    ids = handle.tokenize(TEXTS)
    after_cls = _rows_at(ids, "first")
    _check_prompts(handle, ids, "text", {"text.prompts.1": _tokens(K, 32, 0)}, 2, after_cls)
    # a plain insert at layer 2 lands after [CLS], before the block: the block moves along by its 3 tokens
    before = {"text.prompts.1": _tokens(K, 32, 0), "text.layer.2": _tokens(3, 32, 1)}
    _check_prompts(handle, ids, "text", before, 3, after_cls + 3)


@pytest.mark.parametrize(("family", "modality", "where"), [
    ("hf-clip", "text", "end"), ("hf-clip", "image", "first"), ("hf-siglip", "text", "last"),
    ("hf-siglip", "image", "zero"), ("hf-vision", "image", "first"),
])
def test_each_tower_places_prompts_where_its_inserts_go(tiny_clip_dir, tiny_siglip_dir, tiny_vit_dir, family: str,
                                                        modality: str, where: str) -> None:
    folder = {"hf-clip": tiny_clip_dir, "hf-siglip": tiny_siglip_dir, "hf-vision": tiny_vit_dir}[family]
    handle = graytune.open_backbone(f"{family}:{folder}", "light-gray", reads=[f"{modality}.layer.2"])
    dim = handle.spec.port(f"{modality}.layer.1").shape[-1]
    if modality == "text":
        inputs = handle.tokenize(TEXTS)
        at = _rows_at(inputs, where)
    else:
        inputs = {"image.pixels": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
        at = torch.full((2,), 0 if where == "zero" else 1, dtype=torch.long)
    _check_prompts(handle, inputs, modality, {f"{modality}.prompts.1": _tokens(K, dim, 0)}, 2, at)
    if (family, modality) == ("hf-clip", "text"):  # a plain insert goes before the end token, after the block
        before = {"text.prompts.1": _tokens(K, dim, 0), "text.layer.2": _tokens(3, dim, 1)}
        with torch.no_grad():
            entering = handle.forward(inputs, insert=before, outputs=["text.embeds"],
                                      reads=["text.layer.2"])["text.layer.2"]
        assert entering.shape[1] == inputs["text.input_ids"].shape[1] + K  # read before layer 2's own edits
        _check_prompts(handle, inputs, "text", before, 2, at)


def _identity(folder: Path) -> str:
    """The weights' identity as the ``hf-*`` loaders compute it (what the fingerprint hashes with the spec)."""
    return "+".join(file_identity(w) for w in sorted(folder.glob("*.safetensors")))


def test_the_prompts_ports_leave_every_fingerprint_as_it_was(deep_bert, tiny_clip_dir, tiny_siglip_dir,
                                                             tiny_vit_dir) -> None:
    from graytune.backbones.minilm import load_tower

    cases = [(f"hf-text:{deep_bert}", _identity(deep_bert), ()),
             (f"hf-clip:{tiny_clip_dir}", _identity(tiny_clip_dir), ("image.patch_embeds",)),
             ("arch:clip-tiny", "random:clip-tiny:seed0", ("image.patch_embeds",)),
             (f"hf-siglip:{tiny_siglip_dir}", _identity(tiny_siglip_dir), ()),
             (f"hf-vision:{tiny_vit_dir}", _identity(tiny_vit_dir), ()),
             ("minilm", load_tower().weights_identity, ())]
    for backbone_id, identity, added_before in cases:
        spec = graytune.open_backbone(backbone_id, "light-gray").spec
        prompts = [p for p in spec.ports if is_prompts_port(p.name)]
        layers = [p.name for p in spec.ports if p.kind is PortKind.ENTRY and not is_prompts_port(p.name)]
        assert [p.name for p in prompts] == [n.replace(".layer.", ".prompts.") for n in layers], backbone_id
        assert all(p.ops == (Op.INSERT,) and p.kind is PortKind.ENTRY for p in prompts), backbone_id
        # the spec as it was before the prompts ports, fingerprinted as it was
        before = replace(spec, ports=tuple(p for p in spec.ports if not is_prompts_port(p.name)))
        assert before.with_fingerprint(identity, added_ports=added_before).fingerprint == spec.fingerprint, backbone_id
        # not vacuous: the other ports are hashed, so dropping one changes the fingerprint
        fewer = replace(spec, ports=tuple(p for p in spec.ports if p.name != layers[-1]))
        assert fewer.with_fingerprint(identity, added_ports=added_before).fingerprint != spec.fingerprint, backbone_id
        assert not any(is_prompts_port(p.name) for p in spec.visible_at(AccessLevel.DARK_GRAY).ports)


def test_a_k_mismatch_between_prompts_layers_is_refused_naming_both(deep_bert) -> None:
    handle = graytune.open_backbone(f"hf-text:{deep_bert}", "light-gray")
    insert = {"text.prompts.1": torch.zeros(1, 2, 32), "text.prompts.3": torch.zeros(1, 3, 32)}
    with pytest.raises(InvalidInputError, match=r"text\.prompts\.3: got 3 prompt tokens, but text\.prompts\.1 "
                                                r"placed 2 .* send 2 here"):
        handle.forward({"text": TEXTS}, insert=insert)
    dark = graytune.open_backbone(f"hf-text:{deep_bert}", "dark-gray")
    with pytest.raises(graytune.AccessDeniedError, match="light-gray"):  # entry ports: light-gray, as layer.k
        dark.forward({"text": TEXTS}, insert={"text.prompts.1": torch.zeros(1, 2, 32)})
    with pytest.raises(InvalidInputError, match=r"add is not possible at port text\.prompts\.1 \(it allows: insert\)"):
        handle.forward({"text": TEXTS}, add={"text.prompts.1": torch.zeros(1, 1, 32)})


def test_lga_options_and_a_backbone_without_prompts_ports(deep_bert) -> None:
    spec = graytune.open_backbone(f"hf-text:{deep_bert}", "light-gray").spec
    assert build_adapter("lga", spec, "text", stacking="replace").ports == ("text.prompts.1", "text.prompts.2",
                                                                          "text.prompts.3")
    assert build_adapter("lga", spec, "text").ports == ("text.layer.1", "text.layer.2", "text.layer.3")
    with pytest.raises(InvalidInputError, match="stacking='deep'.*'accumulate' or 'replace'"):
        build_adapter("lga", spec, "text", stacking="deep")
    older = replace(spec, id="old-server", ports=tuple(p for p in spec.ports if not is_prompts_port(p.name)))
    wanted = r"text\.prompts\.1, which 'old-server' does not publish .*text\.layer\.1, text\.layer\.2, text\.layer\.3"
    with pytest.raises(InvalidInputError, match=wanted + r".*stacking='accumulate'"):
        build_adapter("lga", older, "text", stacking="replace")
    # a CNN's layers take only added offsets, which change no sequence: replace leaves them as they are
    cnn = BackboneSpec("cnn", ("image",), (
        PortSpec("image.pixels", PortKind.INPUT, ("B", 3, 8, 8), "float32", (Op.REPLACE,), "image"),
        PortSpec("image.layer.1", PortKind.ENTRY, ("B", 4, "H", "W"), "float32", (Op.ADD,), "image"),
        PortSpec("image.embeds", PortKind.OUTPUT, ("B", 4), "float32", (Op.READ,), "image")))
    assert build_adapter("lga", cnn, "image", stacking="replace").plan == {"image.layer.1": Op.ADD}


def test_lga_deep_trains_and_every_layer_tokens_get_gradient(deep_bert) -> None:
    handle = open_for(f"hf-text:{deep_bert}", None, "lga-deep")
    model = AdaptedModel.build(handle, "lga-deep")
    lga = next(a for a in model.text_adapters if a.name == "lga")
    assert lga.ports == ("text.prompts.1", "text.prompts.2", "text.prompts.3") and lga.config.stacking == "replace"
    targets = F.normalize(torch.randn(len(TEXTS), 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=METHODS["lga-deep"].lr)
    losses = []
    for step in range(8):
        optimizer.zero_grad()
        loss = 1 - (F.normalize(model.encode_text(TEXTS), dim=-1) * targets).sum(-1).mean()
        loss.backward()
        if step == 0:
            for name, tokens in lga.tokens.items():
                assert tokens.grad is not None and tokens.grad.abs().sum() > 0, name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01, losses
    used = handle.exposure.to_dict()["ports"]
    assert {p for p, ops in used.items() if "insert" in ops} == {"text.token_embeds", "text.prompts.1",
                                                                 "text.prompts.2", "text.prompts.3"}


def test_lga_deep_with_gates_is_zero_shot_at_init_and_its_gate_learns(tiny_clip_dir) -> None:
    handle = open_for(f"hf-clip:{tiny_clip_dir}", None, "lga-deep")
    model = AdaptedModel.build(handle, "lga-deep", {"lga.gate": "scalar", "dga-text.gate": "scalar"})
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(TEXTS), handle.encode_text(TEXTS), rtol=0, atol=1e-6)
    F.normalize(model.encode_text(TEXTS), dim=-1).sum(0).square().sum().backward()
    lga = next(a for a in model.text_adapters if a.name == "lga")
    assert lga.ports == ("text.prompts.1", "text.prompts.2")
    assert lga.gate is not None and lga.gate.grad is not None and lga.gate.grad.abs().sum() > 0


def test_a_server_carries_prompts_and_counts_their_positions_once(deep_bert) -> None:
    from graytune.serve import ApiKeys, ServeConfig, create_app
    from graytune.serve.admission import HTTPProblem, check_work
    from graytune.serve.runner import BackgroundServer
    from tests.serve.conftest import ALICE, KEYS

    local = graytune.open_backbone(f"hf-text:{deep_bert}", "light-gray")
    server = BackgroundServer(create_app(local, ServeConfig(access="light-gray"), ApiKeys(KEYS)))
    try:
        remote = graytune.open_backbone(server.start(), "light-gray", api_key=ALICE)
        assert remote.fingerprint == local.fingerprint
        grads = []
        for handle in (local, remote):
            insert = {f"text.prompts.{k}": _tokens(K, 32, k).requires_grad_() for k in (1, 2, 3)}
            out = handle.forward({"text": TEXTS}, insert=insert, outputs=["text.embeds"])["text.embeds"]
            (out ** 2).sum().backward()
            grads.append({port: t.grad for port, t in insert.items()})
        for port in grads[0]:
            assert grads[0][port].abs().sum() > 0, port
            torch.testing.assert_close(grads[1][port], grads[0][port], rtol=1e-5, atol=1e-6)
    finally:
        server.stop()
    ids = {"text.input_ids": torch.zeros(4, 10, dtype=torch.long)}
    prompts = {f"text.prompts.{k}": torch.zeros(1, 3, 32) for k in (1, 2, 3)}
    check_work(ids, {**prompts, "text.layer.1": torch.zeros(1, 2, 32)}, ServeConfig(max_tokens=4 * 15), False)
    with pytest.raises(HTTPProblem, match="60 token positions"):  # 4 rows x (10 + 3 + 2)
        check_work(ids, {**prompts, "text.layer.1": torch.zeros(1, 2, 32)}, ServeConfig(max_tokens=59), False)
