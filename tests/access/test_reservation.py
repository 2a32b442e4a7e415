"""Room for inserted tokens: a text that fills the context is cut just before its end token, not refused.

The tiny CLIP holds 32 positions (a real one 77): a 30-letter word tokenizes to
start + 30 + end = 32 tokens, one per letter.
"""

from __future__ import annotations

import logging

import pytest
import torch

import graytune
from graytune import InvalidInputError
from tests.backbones.tiny_siglip import MAX_POSITIONS, build_tiny_siglip

FULL = "a" * 30  # fills the tiny CLIP's 32 positions
SHORT = "a cat"
K = 3
CLIP_DIM = 32


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):  # type: ignore[no-untyped-def]
    return graytune.open_backbone(f"hf-clip:{tiny_clip_dir}", access="dark-gray")


def _extra(k: int = K, dim: int = CLIP_DIM) -> torch.Tensor:
    return torch.randn(1, k, dim, generator=torch.Generator().manual_seed(0))


def _shortened(tokens: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
    """The first ``keep - 1`` tokens of each row, then its last one (the end token)."""
    return {name: torch.cat([t[:, :keep - 1], t[:, -1:]], dim=1) for name, t in tokens.items()}


def test_a_full_caption_is_cut_before_its_end_token_instead_of_crashing(clip, caplog) -> None:  # type: ignore[no-untyped-def]
    tokens = clip.tokenize([FULL])
    assert tokens["text.input_ids"].shape == (1, 32)
    with caplog.at_level(logging.DEBUG, logger="graytune.access.checks"):
        z = clip.encode_text([FULL], insert={"text.token_embeds": _extra()})
    assert "1 of 1 texts cut just before their end token to 29 tokens" in caplog.text
    reference = clip.encode_text(_shortened(tokens, 32 - K), insert={"text.token_embeds": _extra()})
    torch.testing.assert_close(z, reference)
    plan = clip.check(tokens, insert={"text.token_embeds": _extra()})
    ids = plan.inputs["text.input_ids"]
    assert ids.shape == (1, 32 - K) and ids[0, 0] == tokens["text.input_ids"][0, 0]  # start token kept
    assert ids[0, -1] == tokens["text.input_ids"][0, -1]  # the end token that pooling reads kept


def test_strings_and_ids_from_tokenize_are_cut_the_same_way(clip) -> None:  # type: ignore[no-untyped-def]
    texts = [FULL, SHORT, "b" * 28]  # 30 tokens: 1 too many for 3 inserted ones
    extra = _extra()
    from_strings = clip.encode_text(texts, insert={"text.token_embeds": extra})
    from_ids = clip.encode_text(clip.tokenize(texts), insert={"text.token_embeds": extra})
    torch.testing.assert_close(from_strings, from_ids)
    for i, text in enumerate(texts):  # each row as if sent alone, pre-shortened where it had to be
        alone = clip.tokenize([text])
        if alone["text.input_ids"].shape[1] > 32 - K:
            alone = _shortened(alone, 32 - K)
        torch.testing.assert_close(from_strings[i], clip.encode_text(alone, insert={"text.token_embeds": extra})[0])


def test_short_texts_are_left_exactly_as_they_are(clip) -> None:  # type: ignore[no-untyped-def]
    tokens = clip.tokenize([SHORT, "dogs run far"])
    plan = clip.check(tokens, insert={"text.token_embeds": _extra()})
    assert plan.inputs["text.input_ids"] is tokens["text.input_ids"]
    padded = {n: torch.nn.functional.pad(t, (0, 32 - t.shape[1]), value=0) for n, t in tokens.items()}
    plan = clip.check(padded, insert={"text.token_embeds": _extra()})  # padded by the client: padding goes first
    torch.testing.assert_close(plan.inputs["text.input_ids"][:, :tokens["text.input_ids"].shape[1]],
                               tokens["text.input_ids"])
    assert plan.inputs["text.input_ids"].shape[1] == 32 - K
    torch.testing.assert_close(clip.encode_text(padded, insert={"text.token_embeds": _extra()}),
                               clip.encode_text(tokens, insert={"text.token_embeds": _extra()}))
    full = clip.tokenize([FULL])
    assert clip.check(full).inputs["text.input_ids"] is full["text.input_ids"]  # no insert, no cut


def test_too_many_inserted_tokens_are_still_a_clear_error(clip) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInputError, match=r"31 tokens leave no room for a text in this backbone's 32 "
                                                r"positions.*insert at most 30"):
        clip.encode_text([SHORT], insert={"text.token_embeds": _extra(31)})
    assert clip.encode_text([FULL], insert={"text.token_embeds": _extra(30)}).shape == (1, 16)


def test_a_per_position_add_that_would_not_line_up_is_refused(clip) -> None:  # type: ignore[no-untyped-def]
    tokens = clip.tokenize([FULL])
    with pytest.raises(InvalidInputError, match=r"rows \[0\] of text.input_ids are cut to 29 tokens.*"
                                                r"per-position add at text.token_embeds"):
        clip.encode_text(tokens, add={"text.token_embeds": torch.zeros(1, 32, CLIP_DIM)},
                         insert={"text.token_embeds": _extra()})
    short = clip.tokenize([SHORT])
    length = short["text.input_ids"].shape[1]
    clip.encode_text(short, add={"text.token_embeds": torch.zeros(1, length, CLIP_DIM)},
                     insert={"text.token_embeds": _extra()})  # nothing cut: fine


def test_clip_spec_says_what_happens_to_long_texts(clip) -> None:  # type: ignore[no-untyped-def]
    assert "cut just before its end token" in clip.spec.preprocess["text"]["long_texts"]


def test_siglip_inserts_replace_padding_and_full_texts_are_cut(tmp_path) -> None:  # type: ignore[no-untyped-def]
    h = graytune.open_backbone(f"hf-siglip:{build_tiny_siglip(tmp_path / 's')}", access="dark-gray")
    extra = _extra(2)
    texts = ["x" * 15, SHORT]  # 15 letters + </s> fill the 16 positions
    tokens = h.tokenize(texts)
    assert tokens["text.input_ids"][0, -1] == 1 != tokens["text.input_ids"][0, -2]  # no padding in the full one
    z = h.encode_text(texts, insert={"text.token_embeds": extra})
    plan = h.check(tokens, insert={"text.token_embeds": extra})
    assert plan.inputs["text.input_ids"].shape == (2, MAX_POSITIONS - 2)
    reference = h.encode_text(_shortened(tokens, MAX_POSITIONS - 2), insert={"text.token_embeds": extra})
    torch.testing.assert_close(z, reference)
    assert "padding" in h.spec.preprocess["text"]["long_texts"]


def test_minilm_inserts_come_on_top_of_its_128_tokens() -> None:
    h = graytune.open_backbone("minilm", access="dark-gray")
    text = h.spec.preprocess["text"]
    assert text["max_tokens"] == 128 and text["max_positions"] == 512 and "[SEP]" in text["long_texts"]
    tokens = h.tokenize([" ".join(["word"] * 200)])
    assert tokens["text.input_ids"].shape == (1, 128)
    assert h.check(tokens, insert={"text.token_embeds": torch.zeros(1, 4, 384)}).inputs["text.input_ids"] \
        is tokens["text.input_ids"]  # 132 positions fit: nothing cut
    ids = torch.cat([tokens["text.input_ids"][:, :-1], torch.full((1, 384), 2773), tokens["text.input_ids"][:, -1:]],
                    dim=1)  # 512 ids the client made itself
    cut = h.check({"text.input_ids": ids}, insert={"text.token_embeds": torch.zeros(1, 4, 384)}).inputs
    assert cut["text.input_ids"].shape == (1, 508) and cut["text.input_ids"][0, -1] == 102  # [SEP] kept
    with pytest.raises(InvalidInputError, match="insert at most 510"):
        h.check({"text.input_ids": ids}, insert={"text.token_embeds": torch.zeros(1, 511, 384)})
