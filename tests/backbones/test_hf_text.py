"""The ``hf-text:`` loader, on tiny random BERT, RoBERTa, XLM-R and MPNet encoders the tests build and save.

Every output is compared with the plain transformers model (``AutoModel``) pooled the
sentence-transformers way, and every gradient with plain autograd through that model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import graytune
from graytune import AccessDeniedError, InvalidInputError, MissingDependencyError, PortKind
from tests.backbones.tiny_text_vision import (
    DIM,
    build_tiny_bert,
    build_tiny_mpnet,
    build_tiny_roberta,
    build_tiny_vit,
)

TEXTS = ["a small cat sleeps.", "rain on the roof far away!", "dogs"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-text")
    return {
        "bert-mean": build_tiny_bert(root / "bert-mean"),
        "bert-cls": build_tiny_bert(root / "bert-cls", pooling="cls"),
        "roberta-mean": build_tiny_roberta(root / "roberta-mean"),
        "xlm-roberta-none": build_tiny_roberta(root / "xlmr", pooling=None, model_type="xlm-roberta"),
        "mpnet-mean": build_tiny_mpnet(root / "mpnet-mean", normalize=True, max_seq_length=20),
        "mpnet-cls": build_tiny_mpnet(root / "mpnet-cls", pooling="cls"),
    }


def _open(folder: Path, access: str = "dark-gray", **kwargs):  # type: ignore[no-untyped-def]
    kwargs.setdefault("device", "cpu")  # compared with the plain model on CPU; the gpu test covers CUDA
    return graytune.open_backbone(f"hf-text:{folder}", access=access, **kwargs)


def _plain(folder: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder).eval()


def _loss(z: torch.Tensor) -> torch.Tensor:
    """A fixed random read-out of ``z`` [B, D]: a squared norm would be flat where the model layer-normalises."""
    return (z * torch.randn(z.shape, generator=torch.Generator().manual_seed(7))).sum()


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """sentence-transformers' pooling of ``hidden`` [B, L, D]: the first token, or the masked mean."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def test_spec_publishes_minilm_like_ports(folders) -> None:  # type: ignore[no-untyped-def]
    spec = _open(folders["mpnet-mean"], "light-gray").spec
    assert spec.modalities == ("text",)
    assert spec.port_names(PortKind.INPUT) == ["text.input_ids", "text.attention_mask", "text.token_embeds"]
    assert spec.port_names(PortKind.ENTRY) == ["text.layer.1", "text.layer.2", "text.prompts.1", "text.prompts.2"]
    assert spec.port("text.token_embeds").shape == ("B", "L", DIM)
    assert spec.port("text.embeds").shape == ("B", DIM)
    text = spec.preprocess["text"]
    assert (text["pooling"], text["normalize_declared"], text["max_tokens"], text["max_positions"]) == \
        ("mean", True, 20, 40)  # sentence_bert_config.json's limit; 42 positions less MPNet's offset of 2
    assert "Normalize" in spec.description and "not normalised" in spec.description
    assert _open(folders["mpnet-mean"]).spec.port_names(PortKind.ENTRY) == []  # entries from light-gray only


@pytest.mark.parametrize("name", ["bert-mean", "bert-cls", "roberta-mean", "xlm-roberta-none", "mpnet-mean",
                                  "mpnet-cls"])
def test_outputs_equal_the_plain_model_pooled(folders, name) -> None:  # type: ignore[no-untyped-def]
    h = _open(folders[name], "black-box")
    tokens = h.tokenize(TEXTS)
    assert tokens["text.attention_mask"].sum(1).tolist() != [tokens["text.attention_mask"].shape[1]] * 3  # padded
    with torch.no_grad():
        hidden = _plain(folders[name])(input_ids=tokens["text.input_ids"],
                                       attention_mask=tokens["text.attention_mask"]).last_hidden_state
    pooling = "cls" if name.endswith("cls") else "mean"  # nothing declared (xlm-roberta-none) pools the mean
    assert h.spec.preprocess["text"]["pooling"] == pooling
    torch.testing.assert_close(h.encode_text(TEXTS), _pool(hidden, tokens["text.attention_mask"], pooling))


def test_token_limits_leave_out_the_position_offset(folders) -> None:  # type: ignore[no-untyped-def]
    assert _open(folders["roberta-mean"]).spec.preprocess["text"]["max_tokens"] == 40  # 42 - (padding_idx + 1)
    assert _open(folders["bert-mean"]).spec.preprocess["text"]["max_tokens"] == 40
    roberta = _open(folders["roberta-mean"])
    full = roberta.tokenize([" ".join(["cat"] * 60)])
    assert full["text.input_ids"].shape == (1, 40)  # all 40 positions
    extra = torch.zeros(1, 3, DIM)
    z = roberta.forward(full, insert={"text.token_embeds": extra})["text.embeds"]  # the boundary makes room:
    cut = {name: torch.cat([t[:, :36], t[:, -1:]], dim=1) for name, t in full.items()}  # 37 tokens, </s> kept
    torch.testing.assert_close(z, roberta.forward(cut, insert={"text.token_embeds": extra})["text.embeds"])
    h = _open(folders["mpnet-mean"])
    pre = h.spec.preprocess["text"]
    assert (pre["max_tokens"], pre["max_positions"]) == (20, 40)  # sentence_bert_config.json's limit leaves room
    tokens = h.tokenize([" ".join(["cat"] * 60)])
    assert tokens["text.input_ids"].shape == (1, 20)
    z = h.forward(tokens, insert={"text.token_embeds": torch.zeros(1, 20, DIM)})["text.embeds"]
    assert z.shape == (1, DIM)


@pytest.mark.parametrize("modes", ["max", "weightedmean", "lasttoken", ["mean", "max"]])
def test_a_pooling_it_cannot_do_is_refused(tmp_path, modes) -> None:  # type: ignore[no-untyped-def]
    folder = build_tiny_bert(tmp_path / "bert", pooling=modes)
    with pytest.raises(InvalidInputError, match=r"pooling; graytune pools with one of mean, cls"):
        _open(folder)


def test_modules_it_cannot_run_and_other_model_types_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = build_tiny_bert(tmp_path / "bert")
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(InvalidInputError, match="Dense.*runs Transformer, Pooling, Normalize only"):
        _open(folder)
    vit = build_tiny_vit(tmp_path / "vit")
    with pytest.raises(InvalidInputError, match="'vit' model; hf-text runs bert, roberta, xlm-roberta, mpnet models"):
        _open(vit)


@pytest.mark.parametrize("name", ["bert-mean", "mpnet-cls"])
def test_add_at_token_embeds_gives_plain_autograd_gradients(folders, name) -> None:  # type: ignore[no-untyped-def]
    h = _open(folders[name], "dark-gray")
    tokens = h.tokenize(TEXTS)
    ids, mask = tokens["text.input_ids"], tokens["text.attention_mask"]
    torch.manual_seed(0)
    shift = (0.5 * torch.randn(1, 1, DIM)).requires_grad_(True)
    weights = torch.randn(len(TEXTS), DIM)
    z = h.forward(tokens, add={"text.token_embeds": shift})["text.embeds"]
    (z * weights).sum().backward()
    assert not torch.allclose(z, h.encode_text(tokens), atol=1e-3)  # the shift changes the embedding

    plain = _plain(folders[name])
    ref_shift = shift.detach().clone().requires_grad_(True)
    embeds = plain.get_input_embeddings()(ids) + ref_shift * mask.unsqueeze(-1)  # the delta stays off padding
    hidden = plain(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    ref = _pool(hidden, mask, h.spec.preprocess["text"]["pooling"])
    (ref * weights).sum().backward()
    torch.testing.assert_close(z, ref.detach())
    torch.testing.assert_close(shift.grad, ref_shift.grad)


def test_insert_at_token_embeds_goes_after_the_first_token(folders) -> None:  # type: ignore[no-untyped-def]
    h = _open(folders["mpnet-mean"], "dark-gray")
    tokens = h.tokenize(TEXTS)
    ids, mask = tokens["text.input_ids"], tokens["text.attention_mask"]
    extra = torch.randn(1, 2, DIM, generator=torch.Generator().manual_seed(1))
    z = h.forward(tokens, insert={"text.token_embeds": extra})["text.embeds"]
    plain = _plain(folders["mpnet-mean"])
    with torch.no_grad():
        embeds = plain.get_input_embeddings()(ids)
        embeds = torch.cat([embeds[:, :1], extra.expand(len(ids), -1, -1), embeds[:, 1:]], dim=1)
        mask2 = torch.cat([mask[:, :1], torch.ones(len(ids), 2, dtype=mask.dtype), mask[:, 1:]], dim=1)
        ref = _pool(plain(inputs_embeds=embeds, attention_mask=mask2).last_hidden_state, mask2, "mean")
    torch.testing.assert_close(z, ref)


def test_entry_ports_take_inserts_at_light_gray_only(folders) -> None:  # type: ignore[no-untyped-def]
    tokens = {"text": TEXTS}
    prompt = torch.zeros(1, 3, DIM).requires_grad_(True)
    with pytest.raises(AccessDeniedError, match="light-gray"):
        _open(folders["mpnet-mean"], "dark-gray").forward(tokens, insert={"text.layer.1": prompt})
    h = _open(folders["mpnet-mean"], "light-gray")
    z = h.forward(tokens, insert={"text.layer.1": prompt})["text.embeds"]
    assert z.shape == (3, DIM) and not torch.allclose(z, h.encode_text(TEXTS), atol=1e-4)
    _loss(z).backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0


def test_token_embeds_are_read_only_when_granted(folders) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AccessDeniedError, match="grant"):
        _open(folders["bert-mean"]).forward({"text": TEXTS}, reads=["text.token_embeds"])
    h = _open(folders["bert-mean"], reads=["text.token_embeds"])
    tokens = h.tokenize(TEXTS)
    only = h.forward(tokens, outputs=[], reads=["text.token_embeds"])  # the lookup alone, no forward
    table = _plain(folders["bert-mean"]).get_input_embeddings().weight
    torch.testing.assert_close(only["text.token_embeds"], table[tokens["text.input_ids"]])
    both = h.forward(tokens, reads=["text.token_embeds"])
    assert set(both) == {"text.embeds", "text.token_embeds"}
    assert h.exposure.to_dict()["ports"]["text.token_embeds"] == ["read"]


def test_fingerprint_follows_weights_and_pooling(tmp_path, folders) -> None:  # type: ignore[no-untyped-def]
    mean = _open(folders["bert-mean"]).fingerprint
    assert _open(folders["bert-cls"]).fingerprint != mean  # same weights (same seed), other pooling
    copy = build_tiny_bert(tmp_path / "copy")
    assert _open(copy).fingerprint == mean  # the same files elsewhere


def test_a_missing_folder_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MissingDependencyError, match="is not a directory"):
        _open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingDependencyError, match="never downloads"):
        _open(tmp_path / "empty")
    with pytest.raises(MissingDependencyError, match="never downloads"):
        _open("no-such-owner/no-such-model")  # HF_HUB_OFFLINE=1: nothing is fetched


def test_owner_recomputation_gives_the_same_gradients(folders) -> None:  # type: ignore[no-untyped-def]
    grads = []
    for recompute in (False, True):
        h = _open(folders["mpnet-mean"], "light-gray", recompute=recompute)
        shift = torch.full((1, 1, DIM), 0.1, requires_grad=True)
        prompt = torch.full((1, 2, DIM), 0.2, requires_grad=True)
        z = h.forward({"text": TEXTS}, add={"text.token_embeds": shift}, insert={"text.layer.2": prompt})
        _loss(z["text.embeds"]).backward()
        grads.append((shift.grad, prompt.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_a_bf16_owner_runs_and_returns_float32(folders) -> None:  # type: ignore[no-untyped-def]
    fp32 = _open(folders["mpnet-mean"], "dark-gray")
    bf16 = _open(folders["mpnet-mean"], "dark-gray", dtype="bf16")
    shift = torch.zeros(1, 1, DIM, requires_grad=True)
    z = bf16.forward({"text": TEXTS}, add={"text.token_embeds": shift})["text.embeds"]
    assert z.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(z, fp32.encode_text(TEXTS), dim=-1)
    assert bool((cosine > 0.98).all()), cosine
    _loss(z).backward()
    assert shift.grad is not None and shift.grad.dtype == torch.float32 and bool(torch.isfinite(shift.grad).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_client_of_a_bf16_gpu_owner_gets_what_fp32_on_cpu_gives(folders) -> None:  # type: ignore[no-untyped-def]
    results = []
    for placement in ({"device": "cpu"}, {"device": "cuda", "dtype": "bf16"}):
        h = _open(folders["mpnet-mean"], "light-gray", **placement)
        shift = torch.full((1, 1, DIM), 0.05, requires_grad=True)
        prompt = torch.full((1, 2, DIM), 0.1, requires_grad=True)
        z = h.forward({"text": TEXTS}, add={"text.token_embeds": shift}, insert={"text.layer.1": prompt})
        _loss(z["text.embeds"]).backward()
        results.append((z["text.embeds"], shift.grad, prompt.grad))
    for ref, got in zip(*results):
        assert got.device.type == "cpu" and got.dtype == torch.float32
        assert float(torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)) > 0.98
