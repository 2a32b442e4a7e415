"""memoize: plain forwards answered from memory give what the backbone gives, cost no query, and stay bounded.

On a tiny random CLIP the tests build and save (no real CLIP weights exist here), and on the packaged MiniLM
where a real tokenizer's padding matters.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import graytune
from graytune.access import LocalHandle
from graytune.access.memo import ROW_OVERHEAD, memoize, split_rows
from graytune.errors import InvalidInputError
from graytune.model import AdaptedModel

TEXTS = ["a cat", "rain on the roof", "a dog runs"]


@pytest.fixture
def clip_id(tiny_clip_dir: Path) -> str:
    return f"hf-clip:{tiny_clip_dir}"


def counts(memo) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    return memo.hits, memo.misses, memo.exposure.forward_samples


def test_remembered_rows_equal_the_backbone_and_cost_no_query(clip_id: str) -> None:
    plain = graytune.open_backbone(clip_id, access="black-box")
    memo = memoize(graytune.open_backbone(clip_id, access="black-box"))
    first = memo.encode_text(TEXTS)
    assert counts(memo) == (0, 3, 3)
    again = memo.encode_text(["a dog runs", "a cat", "a much longer sentence than the others"])
    assert counts(memo) == (2, 4, 4)
    torch.testing.assert_close(again, plain.encode_text(["a dog runs", "a cat", "a much longer sentence than the "
                                                         "others"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first, plain.encode_text(TEXTS), atol=1e-5, rtol=1e-5)


def test_token_ids_padded_to_another_length_are_the_same_row_and_left_padding_is_not() -> None:
    """MiniLM's own tokenizer pads on the right; positions count from the left, so left padding changes the output."""
    plain = graytune.open_backbone("minilm", access="black-box")
    memo = memoize(graytune.open_backbone("minilm", access="black-box"))
    short = plain.tokenize(["a red bicycle", "a cat"])
    long = plain.tokenize(["a red bicycle", "a cat on a long winding road by the sea"])
    memo.encode_text(short)
    assert counts(memo) == (0, 2, 2)
    torch.testing.assert_close(memo.encode_text(long)[0], plain.encode_text(long)[0], atol=1e-5, rtol=1e-5)
    assert counts(memo) == (1, 3, 3)  # "a red bicycle" padded to another length: from memory
    ids, mask = short["text.input_ids"][1:], short["text.attention_mask"][1:]  # "a cat", padded on the right
    n = int(mask.sum())
    left = {"text.input_ids": torch.cat([ids[:, n:], ids[:, :n]], 1),
            "text.attention_mask": torch.cat([mask[:, n:], mask[:, :n]], 1)}
    got = memo.encode_text(left)
    assert counts(memo) == (1, 4, 4)  # left padding is another row: the backbone answers it
    torch.testing.assert_close(got, plain.encode_text(left))
    assert not torch.allclose(got, memo.encode_text({"text.input_ids": ids, "text.attention_mask": mask}), atol=1e-3)


def test_padding_the_backbone_never_accepted_is_not_answered_from_memory(clip_id: str) -> None:
    plain = graytune.open_backbone(clip_id, access="black-box")
    memo = memoize(graytune.open_backbone(clip_id, access="black-box"))
    tokens = plain.tokenize(["a cat", "a dog runs far"])
    memo.encode_text(tokens)
    bad = {k: v.clone() for k, v in tokens.items()}
    bad["text.input_ids"][bad["text.attention_mask"] == 0] = -100
    with pytest.raises(InvalidInputError) as plain_error:
        plain.encode_text(bad)
    with pytest.raises(InvalidInputError) as memo_error:
        memo.encode_text(bad)  # "a cat" is remembered, but its padding here is new: the backbone checks it
    assert str(memo_error.value) == str(plain_error.value)


def test_malformed_text_is_refused_as_the_backbone_refuses_it(clip_id: str) -> None:
    plain = graytune.open_backbone(clip_id, access="black-box")
    memo = memoize(graytune.open_backbone(clip_id, access="black-box"))
    for bad in ("a cat", [1, 2], None):
        with pytest.raises(InvalidInputError) as plain_error:
            plain.encode_text(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError) as memo_error:
            memo.encode_text(bad)  # type: ignore[arg-type]
        assert str(memo_error.value) == str(plain_error.value)
    assert counts(memo) == (0, 0, 0)


def test_images_are_remembered_by_their_pixels_and_duplicates_cross_once(clip_id: str) -> None:
    memo = memoize(graytune.open_backbone(clip_id, access="black-box"))
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first = memo.encode_image(pixels)
    changed = pixels.clone()
    changed[1, 0, 0, 0] += 1.0  # one value differs: a new row
    second = memo.encode_image(changed)
    assert counts(memo) == (2, 4, 4)
    torch.testing.assert_close(second[[0, 2]], first[[0, 2]])
    assert not torch.allclose(second[1], first[1])
    twice = torch.stack([changed[1] + 1, changed[1] + 1, changed[1] + 1])
    out = memo.encode_image(twice)
    assert counts(memo) == (4, 5, 5) and torch.equal(out[0], out[2])  # three copies of a new image: one query


def test_an_output_adapter_trains_the_same_through_the_memo(clip_id: str) -> None:
    """Five steps of an output adapter on three texts: the same weights, with three backbone rows, not eighteen."""
    results, samples = [], []
    for wrap in (lambda h: h, memoize):
        handle = wrap(graytune.open_backbone(clip_id, access="black-box"))
        torch.manual_seed(0)
        model = AdaptedModel.build(handle, "output")
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        target = torch.randn(3, model.encode_text(TEXTS).shape[-1], generator=torch.Generator().manual_seed(1))
        for step in range(5):
            order = [step % 3, (step + 1) % 3, (step + 2) % 3]  # another order, so another padding, each step
            loss = (model.encode_text([TEXTS[i] for i in order]) - target[order]).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        results.append({k: v.detach().clone() for k, v in model.adapter_state().items()})
        samples.append(handle.exposure.forward_samples)
    assert results[0].keys() == results[1].keys() and results[0]
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], atol=1e-5, rtol=1e-5)
    assert samples == [18, 3]  # 6 calls of 3 texts, against each text once
    assert any(not torch.allclose(v, torch.zeros_like(v)) for v in results[1].values())


def test_remembered_texts_are_not_tokenized_again(clip_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a server, tokenize is a request carrying the texts: a remembered string is padded from memory."""
    asked: list[list[str]] = []
    real = LocalHandle.tokenize

    def counting(self, texts):  # type: ignore[no-untyped-def]
        asked.append(list(texts))
        return real(self, texts)

    monkeypatch.setattr(LocalHandle, "tokenize", counting)
    plain = graytune.open_backbone(clip_id, access="black-box")
    memo = memoize(graytune.open_backbone(clip_id, access="black-box"))
    memo.tokenize(["a cat", "rain on the roof"])
    for texts in (["rain on the roof", "a cat"], ["a cat"]):
        asked.clear()
        expected = plain.tokenize(texts)
        got = memo.tokenize(texts)
        assert asked == [texts]  # the plain handle's call only
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert memo.tokenize(["a new one"]) and asked[-1] == ["a new one"]


def test_edited_forwards_go_to_the_backbone_with_their_gradients(clip_id: str) -> None:
    plain = graytune.open_backbone(clip_id, access="dark-gray")
    memo = memoize(graytune.open_backbone(clip_id, access="dark-gray"))
    width = plain.spec.port("text.token_embeds").shape[-1]
    grads = []
    for handle in (plain, memo):
        shift = torch.full((1, 1, width), 0.1, requires_grad=True)
        handle.encode_text(TEXTS, add={"text.token_embeds": shift}).sum().backward()
        grads.append(shift.grad)
    torch.testing.assert_close(grads[1], grads[0])
    assert (memo.hits, memo.misses) == (0, 0)  # an edited call is neither remembered nor answered from memory
    pixels = torch.randn(2, 3, 32, 32, requires_grad=True)
    memo.encode_image(pixels).sum().backward()  # an input that needs a gradient is not remembered either
    assert pixels.grad is not None and (memo.hits, memo.misses) == (0, 0)


def test_memory_stays_under_its_bound_least_recently_used_first(clip_id: str) -> None:
    row = 16 * 4  # one tiny-CLIP embedding, float32
    key = 20  # a row's digest
    memo = memoize(graytune.open_backbone(clip_id, access="black-box"), max_mb=2.5 * (row + key + ROW_OVERHEAD) / 2**20)
    memo.encode_text(["a cat", "a dog"])
    memo.encode_text(["a cat"])  # from memory, and now the most recent
    memo.encode_text(["a bird"])  # over the bound: "a dog", the least recently used, goes
    assert memo.bytes <= memo.max_bytes and counts(memo) == (1, 3, 3)
    memo.encode_text(["a cat", "a bird"])
    assert counts(memo) == (3, 3, 3)
    memo.encode_text(["a dog"])
    assert counts(memo) == (3, 4, 4)
    small = memoize(graytune.open_backbone(clip_id, access="black-box"), max_mb=100 / 2**20)
    small.encode_text(["a cat"])  # one row is larger than the whole bound: answered, not kept
    small.encode_text(["a cat"])
    assert counts(small) == (0, 2, 2) and small.bytes == 0


def test_white_box_and_a_bad_bound_are_refused(clip_id: str) -> None:
    with pytest.raises(InvalidInputError, match="white-box handle"):
        memoize(graytune.open_backbone(clip_id, access="white-box"))
    for bad in (0, -1, float("inf"), "256", True):
        with pytest.raises(InvalidInputError, match=f"max_mb must be a finite number of MiB above 0, got {bad!r}"):
            memoize(graytune.open_backbone(clip_id, access="black-box"), max_mb=bad)  # type: ignore[arg-type]


def test_row_keys_drop_trailing_padding_only() -> None:
    ids = torch.tensor([[5, 6, 0, 0], [7, 8, 9, 0], [0, 5, 6, 0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0]])
    short = split_rows({"text.input_ids": ids[:, :3], "text.attention_mask": mask[:, :3]})
    long = split_rows({"text.input_ids": ids, "text.attention_mask": mask})
    assert short is not None and long is not None
    assert short[0][0] == long[0][0] and long[0][0] != long[1][0] and long[0][0] != long[2][0]
    assert long[0][1] == {"text.input_ids": {0}, "text.attention_mask": {0}} and long[2][1]["text.input_ids"] == {0}
    assert split_rows({"text.input_ids": ids, "image.pixels": torch.zeros(2, 3, 4, 4)}) is None
    assert split_rows({"text": "a cat"}) is None and split_rows({"image.pixels": torch.tensor(1.0)}) is None
