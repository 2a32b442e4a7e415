"""Generation through the boundary equals a reference loop without a cache, edits and all.

The reference re-runs the whole sequence through the forward path at every step (the path training
uses) and picks the next token by scoring every vocabulary entry as the last target: no key-value
cache, no decoding code. The owner's cached decoding must choose the same tokens, for each family,
with a shift, a soft prompt, an AdaLink-style token map, LGA tokens inside the decoder and an add there.
"""

from __future__ import annotations

import pytest
import torch

import graytune
from graytune import AccessDeniedError, InvalidInputError
from graytune.model import AdaptedModel
from graytune.types import GenerationSettings
from tests.backbones.tiny_causal import DIM, build_tiny_causal

FAMILIES = ("llama", "qwen2", "gemma3_text", "gpt2")
PROMPT = "the cat sat"


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = build_tiny_causal(tmp_path_factory.mktemp(request.param), request.param, seed=1)
    return f"hf-causal:{folder}"


def _edits(seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return {"shift": 0.5 * torch.randn(1, 1, DIM, generator=g), "prefix": torch.randn(1, 2, DIM, generator=g),
            "down": 0.3 * torch.randn(3, DIM, generator=g), "up": 0.3 * torch.randn(DIM, 3, generator=g),
            "inner": torch.randn(1, 1, DIM, generator=g), "inner_add": 0.5 * torch.randn(1, 1, DIM, generator=g)}


def _reference(handle, ids: list[int], e: dict, steps: int) -> list[int]:  # type: ignore[no-untyped-def]
    """Greedy tokens from full forwards: every candidate scored as the last position's target."""
    vocab = handle.spec.preprocess["text"]["vocab_size"]
    out: list[int] = []
    for _ in range(steps):
        seq = torch.tensor([ids + out])
        x = handle.forward({"text.input_ids": seq, "text.attention_mask": torch.ones_like(seq)}, outputs=[],
                           reads=["text.token_embeds"])["text.token_embeds"]
        delta = x @ e["down"].T @ e["up"].T + e["shift"]  # the map and the shift on every token
        rows = seq.expand(vocab, -1)
        targets = torch.full_like(rows, -100)
        targets[:, -1] = torch.arange(vocab)
        with torch.no_grad():
            scores = handle.forward({"text.input_ids": rows, "text.attention_mask": torch.ones_like(rows),
                                     "text.target_ids": targets},
                                    add={"text.token_embeds": delta, "text.layer.2": e["inner_add"]},
                                    insert={"text.token_embeds": e["prefix"], "text.layer.1": e["inner"]},
                                    outputs=["text.target_logprobs"])["text.target_logprobs"][:, -1]
        out.append(int(scores.argmax()))
    return out


def test_cached_greedy_decoding_equals_the_reference_loop(lm: str) -> None:
    handle = graytune.open_backbone(lm, "light-gray", reads=["text.token_embeds"])
    e = _edits()
    ids = handle.tokenize([PROMPT])["text.input_ids"][0].tolist()
    got = handle.generate({"text": [PROMPT]}, add={"text.token_embeds": e["shift"], "text.layer.2": e["inner_add"]},
                          insert={"text.token_embeds": e["prefix"], "text.layer.1": e["inner"]},
                          maps={"text.token_embeds": {"down": e["down"], "up": e["up"]}},
                          settings=GenerationSettings(max_new_tokens=6, stop_at_eos=False))
    assert got.ids[0].tolist() == _reference(handle, ids, e, 6)
    assert got.lengths.tolist() == [6] and handle.exposure.generated_tokens == 6


def test_rows_of_a_padded_batch_generate_as_they_do_alone(lm: str) -> None:
    handle = graytune.open_backbone(lm, "dark-gray")
    settings = GenerationSettings(max_new_tokens=4, stop_at_eos=False)
    both = handle.generate({"text": ["a dog", PROMPT]}, settings=settings)
    for b, prompt in enumerate(["a dog", PROMPT]):
        alone = handle.generate({"text": [prompt]}, settings=settings)
        assert both.ids[b].tolist() == alone.ids[0].tolist() and both.texts[b] == alone.texts[0]


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(lm: str) -> None:
    handle = graytune.open_backbone(lm, "black-box")
    sample = {"max_new_tokens": 8, "temperature": 1.5, "stop_at_eos": False}
    first, again = (handle.generate({"text": [PROMPT]}, settings={**sample, "seed": 3}).ids for _ in range(2))
    others = [handle.generate({"text": [PROMPT]}, settings={**sample, "seed": s}).ids for s in range(4, 8)]
    assert torch.equal(first, again) and any(not torch.equal(first, o) for o in others)
    greedy = handle.generate({"text": [PROMPT]}, settings={"max_new_tokens": 8, "stop_at_eos": False}).ids
    narrow = handle.generate({"text": [PROMPT]}, settings={**sample, "top_p": 1e-6}).ids
    assert torch.equal(greedy, narrow)


def test_an_adapted_model_generates_with_its_adapters(lm: str) -> None:
    handle = graytune.open_backbone(lm, "dark-gray", reads=["text.token_embeds"])
    model = AdaptedModel.build(handle, "adalink", {"rank": 3})
    e = _edits(1)
    with torch.no_grad():
        model.text_adapters[0].down.weight.copy_(e["down"])
        model.text_adapters[0].up.weight.copy_(e["up"])
    settings = GenerationSettings(max_new_tokens=5, stop_at_eos=False)
    got = model.generate([PROMPT], settings)
    direct = handle.generate({"text": [PROMPT]}, maps={"text.token_embeds": {"down": e["down"], "up": e["up"]}},
                             settings=settings)
    plain = handle.generate({"text": [PROMPT]}, settings=settings)
    assert torch.equal(got.ids, direct.ids) and got.texts == direct.texts
    streamed: list[str] = []
    model.generate([PROMPT], settings, stream=lambda texts: streamed.append(texts[0]))
    assert len(streamed) == 5 and streamed[-1] == got.texts[0]
    assert plain.ids.shape == got.ids.shape


def test_generation_refuses_what_it_cannot_do(lm: str, tmp_path) -> None:
    handle = graytune.open_backbone(lm, "dark-gray")
    with pytest.raises(AccessDeniedError, match="text.token_embeds"):  # a map reads the embeddings: a grant
        handle.generate({"text": [PROMPT]}, maps={"text.token_embeds": {"down": torch.zeros(2, DIM),
                                                                        "up": torch.zeros(DIM, 2)}})
    with pytest.raises(InvalidInputError, match="max_new_tokens must be a whole number from 1 to 1024; got 0"):
        handle.generate({"text": [PROMPT]}, settings={"max_new_tokens": 0})
    with pytest.raises(InvalidInputError, match="unknown generation settings \\['beams'\\]"):
        handle.generate({"text": [PROMPT]}, settings={"beams": 2})
    with pytest.raises(InvalidInputError, match="context of 64 positions"):
        handle.generate({"text": [PROMPT]}, settings={"max_new_tokens": 100, "stop_at_eos": False})
    shift = torch.zeros(1, 1, DIM, requires_grad=True)  # a trainable tensor is sent as values: no VJP is asked
    handle.generate({"text": [PROMPT]}, add={"text.token_embeds": shift}, settings={"max_new_tokens": 1})
    assert handle.exposure.gradient_queries == 0


def test_an_encoder_cannot_generate() -> None:
    with pytest.raises(InvalidInputError, match="minilm is not a language model"):
        graytune.open_backbone("minilm", "black-box").generate({"text": ["a cat"]})
