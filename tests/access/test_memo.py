"""memoize: plain forwards answered from memory give what the backbone gives, cost no query, and stay bounded.

On a tiny random CLIP the tests build and save (no real CLIP weights exist here).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import graytune
from graytune.access.memo import memoize, row_keys
from graytune.errors import InvalidInputError
from graytune.model import AdaptedModel

TEXTS = ["a cat", "rain on the roof", "a dog runs"]


@pytest.fixture
def clip_id(tiny_clip_dir: Path) -> str:
    return f"hf-clip:{tiny_clip_dir}"


def test_remembered_rows_equal_the_backbone_and_cost_no_query(clip_id: str) -> None:
    plain = graytune.open_backbone(clip_id, access="black-box")
    memo = memoize(graytune.open_backbone(clip_id, access="black-box"))
    first = memo.encode_text(TEXTS)
    assert (memo.hits, memo.misses, memo.exposure.forward_samples) == (0, 3, 3)
    # the same texts in another order, padded to another length beside a longer new one
    again = memo.encode_text(["a dog runs", "a cat", "a much longer sentence than the others"])
    assert (memo.hits, memo.misses, memo.exposure.forward_samples) == (2, 4, 4)
    expected = plain.encode_text(["a dog runs", "a cat", "a much longer sentence than the others"])
    torch.testing.assert_close(again, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first, plain.encode_text(TEXTS), atol=1e-5, rtol=1e-5)


def test_images_are_remembered_by_their_pixels(clip_id: str) -> None:
    memo = memoize(graytune.open_backbone(clip_id, access="black-box"))
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first = memo.encode_image(pixels)
    changed = pixels.clone()
    changed[1, 0, 0, 0] += 1.0  # one value differs: a new row
    second = memo.encode_image(changed)
    assert (memo.hits, memo.misses) == (2, 4)
    torch.testing.assert_close(second[[0, 2]], first[[0, 2]])
    assert not torch.allclose(second[1], first[1])


def test_an_output_adapter_trains_the_same_through_the_memo(clip_id: str) -> None:
    """Five steps of an output adapter on three texts: the same weights, with three backbone rows, not fifteen."""
    results, samples = [], []
    for wrap in (lambda h: h, memoize):
        handle = wrap(graytune.open_backbone(clip_id, access="black-box"))
        torch.manual_seed(0)
        model = AdaptedModel.build(handle, "output")
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        target = torch.randn(3, model.encode_text(TEXTS).shape[-1], generator=torch.Generator().manual_seed(1))
        for _ in range(5):
            loss = (model.encode_text(TEXTS) - target).pow(2).mean()
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


def test_memory_stays_under_its_bound(clip_id: str) -> None:
    memo = memoize(graytune.open_backbone(clip_id, access="black-box"), max_mb=2 * 16 * 4 / 2**20)  # two rows
    memo.encode_text(TEXTS)
    assert memo.bytes <= memo.max_bytes and len(memo._rows) == 2
    memo.encode_text(["a cat"])  # the oldest row was dropped: asked again
    assert (memo.hits, memo.misses) == (0, 4)


def test_white_box_and_a_bad_bound_are_refused(clip_id: str) -> None:
    with pytest.raises(InvalidInputError, match="white-box handle"):
        memoize(graytune.open_backbone(clip_id, access="white-box"))
    with pytest.raises(InvalidInputError, match="max_mb must be above 0, got 0"):
        memoize(graytune.open_backbone(clip_id, access="black-box"), max_mb=0)


def test_row_keys_ignore_padding_and_refuse_mixed_batches() -> None:
    ids = torch.tensor([[5, 6, 0, 0], [7, 8, 9, 0]])
    mask = (ids > 0).long()
    short = {"text.input_ids": ids[:, :3], "text.attention_mask": mask[:, :3]}
    long = {"text.input_ids": ids, "text.attention_mask": mask}
    assert row_keys(short)[0] == row_keys(long)[0] and row_keys(long)[0] != row_keys(long)[1]
    assert row_keys({"text.input_ids": ids, "image.pixels": torch.zeros(3, 3, 4, 4)}) is None
