"""The ``hf-causal:`` loader on tiny random Llama, Qwen2, Gemma 3 and GPT-2 models the tests build and save.

Every output is compared with the plain transformers model (``AutoModelForCausalLM``), and every
gradient with plain autograd through that model: prefix inserts by prepending to ``inputs_embeds``,
adds at ``text.layer.k`` by a pre-hook on decoder layer k, inserts at ``text.layer.k`` by running the
layers from k on (a copy of the model cut there) over the prefix and the hidden states entering layer k.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import graytune
from graytune import InvalidInputError, MissingDependencyError, PortKind
from tests.backbones.tiny_causal import (
    CONTEXT,
    DIM,
    FAMILIES,
    LAYERS,
    build_tiny_causal,
    build_tiny_gemma3_multimodal,
    write_tiny_gguf,
)
from tests.backbones.tiny_text_vision import build_tiny_bert

TEXTS = ["the cat sat on the dog", "a cat", "the dog sat"]
IGNORE = -100


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-causal")
    return {family: build_tiny_causal(root / family, family) for family in FAMILIES}


def _open(folder: Path | str, access: str = "dark-gray", **kwargs):  # type: ignore[no-untyped-def]
    kwargs.setdefault("device", "cpu")  # compared with the plain model on CPU
    return graytune.open_backbone(f"hf-causal:{folder}", access=access, **kwargs)


def _plain(folder: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _batch(h) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """``TEXTS`` tokenized (right-padded) with targets: the ids shifted left, -100 at the end, at padding and
    over row 0's two-token "prompt"."""
    tokens = h.tokenize(TEXTS)
    ids, mask = tokens["text.input_ids"], tokens["text.attention_mask"]
    targets = torch.full_like(ids, IGNORE)
    targets[:, :-1] = ids[:, 1:]
    targets[:, :-1][mask[:, 1:] == 0] = IGNORE
    targets[0, :2] = IGNORE
    assert mask.sum(1).tolist() != [ids.shape[1]] * len(TEXTS)  # the batch is padded
    return {**tokens, "text.target_ids": targets}


def _picked(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` log p(target) from plain logits ``[B, L, V]``, 0.0 where the target is -100."""
    logprobs = logits.float().log_softmax(-1).gather(2, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return logprobs * (targets != IGNORE)


def _weights(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.randn(batch["text.target_ids"].shape, generator=torch.Generator().manual_seed(7))


def _layers(model):  # type: ignore[no-untyped-def]
    return model.transformer.h if model.config.model_type == "gpt2" else model.model.layers


def _from_layer(model, k: int):  # type: ignore[no-untyped-def]
    """A copy of ``model`` that runs its layers k.. on ``inputs_embeds`` (GPT-2's input position embeddings off)."""
    tail = copy.deepcopy(model)
    if model.config.model_type == "gpt2":
        tail.transformer.h = torch.nn.ModuleList(list(tail.transformer.h)[k:])
        tail.transformer.wpe.weight.data.zero_()
    else:
        tail.model.layers = torch.nn.ModuleList(list(tail.model.layers)[k:])
    if getattr(tail.config, "layer_types", None):
        tail.config.layer_types = tail.config.layer_types[k:]
    tail.config.num_hidden_layers = LAYERS - k
    return tail


def _entering(model, k: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, L, D]``: the hidden states entering layer k of the plain model."""
    seen = []
    hook = _layers(model)[k].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=batch["text.input_ids"], attention_mask=batch["text.attention_mask"])
    hook.remove()
    return seen[0]


def test_spec_publishes_the_causal_ports(folders) -> None:  # type: ignore[no-untyped-def]
    spec = _open(folders["llama"], "light-gray").spec
    assert spec.modalities == ("text",)
    assert spec.port_names(PortKind.INPUT) == ["text.input_ids", "text.attention_mask", "text.target_ids",
                                               "text.token_embeds"]
    assert spec.port_names(PortKind.ENTRY) == ["text.layer.1", "text.layer.2", "text.prompts.1", "text.prompts.2"]
    assert spec.port_names(PortKind.OUTPUT) == ["text.target_logprobs", "text.top_ids", "text.top_logprobs"]
    assert spec.port("text.target_logprobs").shape == ("B", "L")
    assert spec.port("text.top_ids").shape == spec.port("text.top_logprobs").shape == ("B", "L", "k")
    assert spec.port("text.token_embeds").shape == ("B", "L", DIM)
    text = spec.preprocess["text"]
    assert (text["max_positions"], text["vocab_size"], text["pad_token_id"], text["eos_token_ids"]) == \
        (CONTEXT, 269, 268, [268])  # no pad token of its own: the end token pads
    assert (text["insert_position"], text["padding_side"], text["chat_template"]) == \
        ("before the first token", "right", None)  # the template text, or None
    assert "-100" in text["targets"]
    assert "sqrt(D)" in _open(folders["gemma3_text"]).spec.port("text.token_embeds").doc
    assert "sqrt(D)" not in spec.port("text.token_embeds").doc


def test_the_top_k_ports_leave_the_fingerprint_as_it_was(folders) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from graytune.backbones.loading import file_identity

    spec = _open(folders["llama"], "light-gray").spec
    identity = "+".join(file_identity(w) for w in sorted(folders["llama"].glob("*.safetensors")))
    before = replace(spec, ports=tuple(p for p in spec.ports if p.name not in ("text.top_ids", "text.top_logprobs")))
    assert before.with_fingerprint(identity).fingerprint == spec.fingerprint  # adapters trained before still load


@pytest.mark.parametrize("family", FAMILIES)
def test_target_logprobs_equal_plain_transformers(folders, family) -> None:  # type: ignore[no-untyped-def]
    h = _open(folders[family], "black-box")
    batch = _batch(h)
    got = h.forward(batch)["text.target_logprobs"]
    with torch.no_grad():
        logits = _plain(folders[family])(input_ids=batch["text.input_ids"],
                                         attention_mask=batch["text.attention_mask"]).logits
    torch.testing.assert_close(got, _picked(logits, batch["text.target_ids"]))
    assert got.dtype == torch.float32 and bool((got[batch["text.target_ids"] == IGNORE] == 0).all())
    assert bool((got[batch["text.target_ids"] != IGNORE] < 0).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_vjps_at_token_embeds_equal_plain_autograd(folders, family) -> None:  # type: ignore[no-untyped-def]
    h = _open(folders[family], "dark-gray")
    batch = _batch(h)
    ids, mask, targets = batch["text.input_ids"], batch["text.attention_mask"], batch["text.target_ids"]
    torch.manual_seed(0)
    shift = (0.3 * torch.randn(1, 1, DIM)).requires_grad_(True)
    prompt = (0.3 * torch.randn(1, 2, DIM)).requires_grad_(True)
    got = h.forward(batch, add={"text.token_embeds": shift}, insert={"text.token_embeds": prompt})
    (got["text.target_logprobs"] * _weights(batch)).sum().backward()

    plain = _plain(folders[family])
    ref_shift, ref_prompt = (t.detach().clone().requires_grad_(True) for t in (shift, prompt))
    embeds = plain.get_input_embeddings()(ids) + ref_shift * mask.unsqueeze(-1)  # the delta stays off padding
    embeds = torch.cat([ref_prompt.expand(len(ids), -1, -1), embeds], dim=1)  # the prefix
    mask2 = torch.cat([torch.ones(len(ids), 2, dtype=mask.dtype), mask], dim=1)
    ref = _picked(plain(inputs_embeds=embeds, attention_mask=mask2).logits[:, 2:], targets)
    (ref * _weights(batch)).sum().backward()
    torch.testing.assert_close(got["text.target_logprobs"], ref.detach())
    torch.testing.assert_close(shift.grad, ref_shift.grad)
    torch.testing.assert_close(prompt.grad, ref_prompt.grad)


@pytest.mark.parametrize("family", FAMILIES)
def test_vjp_of_an_add_at_a_layer_equals_plain_autograd(folders, family) -> None:  # type: ignore[no-untyped-def]
    h = _open(folders[family], "light-gray")
    batch = _batch(h)
    mask = batch["text.attention_mask"]
    delta = (0.3 * torch.randn(1, 1, DIM, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    got = h.forward(batch, add={"text.layer.2": delta})["text.target_logprobs"]
    (got * _weights(batch)).sum().backward()

    plain = _plain(folders[family])
    ref_delta = delta.detach().clone().requires_grad_(True)
    hook = _layers(plain)[2].register_forward_pre_hook(
        lambda _m, args: (args[0] + ref_delta * mask.unsqueeze(-1), *args[1:]))
    logits = plain(input_ids=batch["text.input_ids"], attention_mask=mask).logits
    hook.remove()
    ref = _picked(logits, batch["text.target_ids"])
    (ref * _weights(batch)).sum().backward()
    torch.testing.assert_close(got, ref.detach())
    torch.testing.assert_close(delta.grad, ref_delta.grad)


@pytest.mark.parametrize("family", FAMILIES)
def test_vjp_of_an_insert_at_a_layer_equals_plain_autograd(folders, family) -> None:  # type: ignore[no-untyped-def]
    h = _open(folders[family], "light-gray")
    batch = _batch(h)
    mask = batch["text.attention_mask"]
    tokens = (0.3 * torch.randn(1, 3, DIM, generator=torch.Generator().manual_seed(2))).requires_grad_(True)
    got = h.forward(batch, insert={"text.layer.1": tokens})["text.target_logprobs"]
    (got * _weights(batch)).sum().backward()

    plain = _plain(folders[family])
    entering = _entering(plain, 1, batch)  # [B, L, D]: layer 0 never sees the inserted tokens
    ref_tokens = tokens.detach().clone().requires_grad_(True)
    hidden = torch.cat([ref_tokens.expand(len(entering), -1, -1), entering], dim=1)
    mask2 = torch.cat([torch.ones(len(mask), 3, dtype=mask.dtype), mask], dim=1)
    ref = _picked(_from_layer(plain, 1)(inputs_embeds=hidden, attention_mask=mask2, use_cache=False).logits[:, 3:],
                  batch["text.target_ids"])
    (ref * _weights(batch)).sum().backward()
    torch.testing.assert_close(got, ref.detach())
    torch.testing.assert_close(tokens.grad, ref_tokens.grad)


def test_a_first_prompts_port_inserts_as_an_insert_at_its_layer(folders) -> None:  # type: ignore[no-untyped-def]
    h = _open(folders["qwen2"], "light-gray")
    batch = _batch(h)
    tokens = torch.randn(1, 2, DIM, generator=torch.Generator().manual_seed(3))
    via_prompts = h.forward(batch, insert={"text.prompts.1": tokens})["text.target_logprobs"]
    torch.testing.assert_close(via_prompts, h.forward(batch, insert={"text.layer.1": tokens})["text.target_logprobs"])
    deep = torch.randn(1, 2, DIM, generator=torch.Generator().manual_seed(4), requires_grad=True)
    both = h.forward(batch, insert={"text.prompts.1": tokens, "text.prompts.2": deep})["text.target_logprobs"]
    both.sum().backward()  # the second writes over the first's two positions: the text keeps its positions
    assert deep.grad is not None and float(deep.grad.abs().sum()) > 0
    with pytest.raises(InvalidInputError, match="same K"):
        h.forward(batch, insert={"text.prompts.1": tokens, "text.prompts.2": torch.zeros(1, 3, DIM)})


def test_reads_give_the_embedding_rows_and_the_hidden_states(folders) -> None:  # type: ignore[no-untyped-def]
    h = _open(folders["gemma3_text"], "light-gray", reads=["text.token_embeds", "text.layer.2"])
    batch = _batch(h)
    only = h.forward(batch, outputs=[], reads=["text.token_embeds"])  # the lookup alone
    plain = _plain(folders["gemma3_text"])
    torch.testing.assert_close(only["text.token_embeds"], plain.get_input_embeddings()(batch["text.input_ids"]))
    prefix = torch.zeros(1, 2, DIM)
    both = h.forward(batch, insert={"text.token_embeds": prefix}, reads=["text.layer.2"])
    assert both["text.layer.2"].shape == (len(TEXTS), batch["text.input_ids"].shape[1] + 2, DIM)  # prefix first


def test_bad_ids_and_targets_name_what_was_sent_and_the_limit(folders) -> None:  # type: ignore[no-untyped-def]
    h = _open(folders["llama"], "black-box")
    batch = _batch(h)
    ids = batch["text.input_ids"].clone()
    ids[1, 0] = 300
    with pytest.raises(InvalidInputError, match=r"ids must lie in \[0, 269\); got \d+\.\.300"):
        h.forward({**batch, "text.input_ids": ids})
    targets = batch["text.target_ids"].clone()
    targets[0, 3] = 269
    with pytest.raises(InvalidInputError, match=r"text.target_ids: ids must lie in \[0, 269\) or be -100.*\[269\]"):
        h.forward({**batch, "text.target_ids": targets})
    longer = torch.cat([batch["text.target_ids"], torch.zeros(len(TEXTS), 2, dtype=torch.long)], dim=1)
    width = batch["text.input_ids"].shape[1]
    with pytest.raises(InvalidInputError, match=rf"shape \[3, {width + 2}\] but text.input_ids has \[3, {width}\] "
                                                r"\(targets longer than the input\)"):
        h.forward({**batch, "text.target_ids": longer})
    with pytest.raises(InvalidInputError, match="text.target_logprobs needs text.target_ids"):
        h.forward({"text": TEXTS})
    with pytest.raises(InvalidInputError, match="text.target_logprobs needs text.target_ids"):
        h.forward({"text": TEXTS}, outputs=["text.target_logprobs"])


def test_texts_over_the_context_are_refused_not_cut(folders) -> None:  # type: ignore[no-untyped-def]
    h = _open(folders["gpt2"], "light-gray")  # GPT-2: 64 learned positions, a hard limit
    long = h.tokenize([" cat" * 70])
    assert long["text.input_ids"].shape == (1, 70)  # tokenize never cuts
    targets = torch.full_like(long["text.input_ids"], IGNORE)
    with pytest.raises(InvalidInputError, match="a row of 70 tokens plus 0 inserted tokens needs 70 positions; "
                                                "this model's context is 64 positions"):
        h.forward({**long, "text.target_ids": targets})
    fits = h.tokenize([" cat" * 60])
    fits["text.target_ids"] = torch.full_like(fits["text.input_ids"], IGNORE)
    h.forward(fits, insert={"text.token_embeds": torch.zeros(1, 4, DIM)})  # 64: just fits
    with pytest.raises(InvalidInputError, match=r"60 tokens plus 6 inserted tokens needs 66 positions.*send at "
                                                r"most 58 tokens per row or insert fewer tokens"):
        h.forward(fits, insert={"text.token_embeds": torch.zeros(1, 4, DIM), "text.layer.1": torch.zeros(1, 2, DIM)})
    padded = {name: torch.cat([t, t[:, -1:].expand(-1, 10)], dim=1) for name, t in fits.items()}  # 70 columns
    padded["text.attention_mask"][:, 60:] = 0
    wide = h.forward(padded, insert={"text.token_embeds": torch.zeros(1, 4, DIM)})["text.target_logprobs"]
    assert wide.shape == (1, 70)  # padding takes no position: nothing is cut
    with pytest.raises(InvalidInputError, match="65 positions"):  # prompts ports share one block: counted once
        h.forward(fits, insert={"text.token_embeds": torch.zeros(1, 3, DIM), "text.prompts.1": torch.zeros(1, 2, DIM),
                                "text.prompts.2": torch.zeros(1, 2, DIM)})


def test_a_multimodal_gemma3_runs_its_language_model_alone(tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = build_tiny_gemma3_multimodal(tmp_path / "gemma3")
    h = _open(folder)
    assert "Gemma3ForCausalLM" in h.spec.description  # the vision tower is dropped
    batch = _batch(h)
    with torch.no_grad():
        logits = _plain(folder)(input_ids=batch["text.input_ids"], attention_mask=batch["text.attention_mask"]).logits
    torch.testing.assert_close(h.forward(batch)["text.target_logprobs"], _picked(logits, batch["text.target_ids"]))


def test_fingerprint_follows_the_weights_not_the_folder(tmp_path, folders) -> None:  # type: ignore[no-untyped-def]
    first = _open(folders["llama"]).fingerprint
    assert _open(build_tiny_causal(tmp_path / "copy", "llama")).fingerprint == first
    assert _open(build_tiny_causal(tmp_path / "other", "llama", seed=1)).fingerprint != first


def test_other_model_types_and_missing_files_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInputError, match="'bert' model; hf-causal runs llama, qwen2, gemma3_text, gemma3, "
                                                "gpt2"):
        _open(build_tiny_bert(tmp_path / "bert"))
    with pytest.raises(MissingDependencyError, match="is not a directory"):
        _open(tmp_path / "nope")
    with pytest.raises(MissingDependencyError, match="is not a file; give a .gguf file"):
        _open(tmp_path / "nope.gguf")
    with pytest.raises(MissingDependencyError, match="never downloads"):
        _open("no-such-owner/no-such-model")  # HF_HUB_OFFLINE=1: nothing is fetched


def test_a_gguf_file_loads_as_the_model_it_was_written_from(tmp_path, folders) -> None:  # type: ignore[no-untyped-def]
    gguf = write_tiny_gguf(folders["llama"], tmp_path / "tiny-llama.gguf")
    h = _open(gguf)
    batch = _batch(h)
    assert batch["text.input_ids"].tolist() == _batch(_open(folders["llama"]))["text.input_ids"].tolist()
    with torch.no_grad():
        logits = _plain(folders["llama"])(input_ids=batch["text.input_ids"],
                                          attention_mask=batch["text.attention_mask"]).logits
    torch.testing.assert_close(h.forward(batch)["text.target_logprobs"], _picked(logits, batch["text.target_ids"]))


def test_no_gguf_package_says_what_to_install(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import importlib.util

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(MissingDependencyError, match="pip install gguf"):
        _open(tmp_path / "m.gguf")


def test_owner_recomputation_gives_the_same_gradients(folders) -> None:  # type: ignore[no-untyped-def]
    grads = []
    for recompute in (False, True):
        h = _open(folders["qwen2"], "light-gray", recompute=recompute)
        batch = _batch(h)
        shift = torch.full((1, 1, DIM), 0.1, requires_grad=True)
        prompt = torch.full((1, 2, DIM), 0.2, requires_grad=True)
        out = h.forward(batch, add={"text.token_embeds": shift}, insert={"text.layer.2": prompt})
        (out["text.target_logprobs"] * _weights(batch)).sum().backward()
        grads.append((shift.grad, prompt.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_a_bf16_owner_runs_and_returns_float32(folders) -> None:  # type: ignore[no-untyped-def]
    fp32, bf16 = _open(folders["llama"]), _open(folders["llama"], dtype="bf16")
    batch = _batch(fp32)
    shift = torch.zeros(1, 1, DIM, requires_grad=True)
    got = bf16.forward(batch, add={"text.token_embeds": shift})["text.target_logprobs"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, fp32.forward(batch)["text.target_logprobs"], atol=0.05, rtol=0.02)
    got.sum().backward()
    assert shift.grad is not None and shift.grad.dtype == torch.float32 and bool(torch.isfinite(shift.grad).all())


def test_arch_llama_tiny_has_random_weights_and_no_tokenizer() -> None:
    h = graytune.open_backbone("arch:llama-tiny", access="light-gray", device="cpu")
    assert h.spec.port_names(PortKind.ENTRY)[:2] == ["text.layer.1", "text.layer.2"]
    assert h.spec.preprocess["text"]["vocab_size"] == 128
    assert h.fingerprint == graytune.open_backbone("arch:llama-tiny").fingerprint  # a fixed seed
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    out = h.forward({"text.input_ids": ids, "text.target_ids": ids.roll(-1, 1)})["text.target_logprobs"]
    assert out.shape == (2, 10) and bool((out < 0).all())
    with pytest.raises(InvalidInputError, match="no tokenizer.*send text.input_ids"):
        h.forward({"text": ["a cat"]})
    with pytest.raises(graytune.UnknownNameError, match="llama-1b"):
        graytune.open_backbone("arch:llama-2b")


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_a_prefill_fills_a_cache_transformers_decodes_from(folders, family) -> None:  # type: ignore[no-untyped-def]
    from transformers import DynamicCache

    from graytune.backbones import load_backbone
    from graytune.backbones.tokens import PortEdits

    backbone = load_backbone(f"hf-causal:{folders[family]}")
    ids = backbone.tokenize(["the cat sat on the dog"])["text.input_ids"]  # [1, L]
    cache = DynamicCache(config=backbone.model.config)
    with torch.no_grad():
        backbone.hidden_states(ids[:, :-1], torch.ones_like(ids[:, :-1]), PortEdits({}, {}, (), {}), cache=cache)
        step = backbone.model(input_ids=ids[:, -1:], cache=cache, use_cache=True).logits[:, -1]  # the plain model
        whole = _plain(folders[family])(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(step, whole)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_client_of_a_bf16_gpu_owner_gets_what_fp32_on_cpu_gives(folders) -> None:  # type: ignore[no-untyped-def]
    results = []
    for placement in ({"device": "cpu"}, {"device": "cuda", "dtype": "bf16"}):
        h = _open(folders["llama"], "light-gray", **placement)
        batch = _batch(h)
        shift = torch.full((1, 1, DIM), 0.05, requires_grad=True)
        prompt = torch.full((1, 2, DIM), 0.1, requires_grad=True)
        out = h.forward(batch, add={"text.token_embeds": shift}, insert={"text.layer.1": prompt})
        (out["text.target_logprobs"] * _weights(batch)).sum().backward()
        results.append((out["text.target_logprobs"], shift.grad, prompt.grad))
    for ref, got in zip(*results):
        assert got.device.type == "cpu" and got.dtype == torch.float32
        assert float(torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)) > 0.98
