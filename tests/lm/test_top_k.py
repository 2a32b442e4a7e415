"""Top-k log-probabilities, an owner's grant: equal to plain transformers, refused without the grant or above it,
and counted in the exposure record (positions x k)."""

from __future__ import annotations

import pytest
import torch

import graytune
from graytune import AccessDeniedError, InvalidInputError
from graytune.types import MAX_TOP_K, TOP_IDS, TOP_LOGPROBS
from tests.backbones.tiny_causal import DIM, build_tiny_causal

FAMILIES = ("llama", "qwen2", "gemma3_text", "gpt2")
TEXTS = ["the cat sat on the dog", "a dog"]  # of different lengths: the second row is padded


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"hf-causal:{build_tiny_causal(tmp_path_factory.mktemp(request.param), request.param, seed=2)}"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"hf-causal:{build_tiny_causal(tmp_path_factory.mktemp('llama'), 'llama', seed=2)}"


def _plain_top_k(source: str, batch: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk of log_softmax of the plain transformers model's logits (float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source.removeprefix("hf-causal:"), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["text.input_ids"], attention_mask=batch["text.attention_mask"]).logits
    top = logits.float().log_softmax(-1).topk(k, dim=-1)
    return top.indices, top.values


def test_top_k_equals_plain_transformers_at_every_real_position(lm: str) -> None:
    handle = graytune.open_backbone(lm, "black-box", top_k=5)
    batch = handle.tokenize(TEXTS)
    out = handle.forward(batch, outputs=[], top_k=4)
    assert set(out) == {TOP_IDS, TOP_LOGPROBS}
    ids, values = out[TOP_IDS], out[TOP_LOGPROBS]
    assert ids.dtype == torch.int64 and values.dtype == torch.float32 and ids.shape == (2, ids.shape[1], 4)
    ref_ids, ref_values = _plain_top_k(lm, batch, 4)
    real = batch["text.attention_mask"].bool()
    assert torch.equal(ids[real], ref_ids[real])
    torch.testing.assert_close(values[real], ref_values[real], rtol=1e-5, atol=1e-5)
    assert (ids[~real] == -100).all() and (values[~real] == 0).all() and (~real).any()
    assert (values[real].diff(dim=-1) <= 0).all()  # most likely first


def test_top_k_rides_beside_target_logprobs_and_edits_without_a_gradient(llama: str) -> None:
    handle = graytune.open_backbone(llama, "dark-gray", top_k=3)
    batch = handle.tokenize(TEXTS)
    targets = batch["text.input_ids"].roll(-1, dims=1).masked_fill(batch["text.attention_mask"].roll(-1, 1) == 0,
                                                                     -100)
    targets[:, -1] = -100
    shift = torch.zeros(1, 1, DIM, requires_grad=True)
    out = handle.forward({**batch, "text.target_ids": targets}, add={"text.token_embeds": shift},
                         outputs=["text.target_logprobs"], top_k=3)
    assert set(out) == {"text.target_logprobs", TOP_IDS, TOP_LOGPROBS}
    assert not out[TOP_LOGPROBS].requires_grad
    out["text.target_logprobs"].sum().backward()
    assert shift.grad is not None and shift.grad.abs().sum() > 0
    # each target's log-prob is at most the best next token's, and equals it where the target is the top token
    has = targets != -100
    assert (out["text.target_logprobs"][has] <= out[TOP_LOGPROBS][..., 0][has] + 1e-6).all()
    # default outputs stay what they were: the top-k outputs come only with top_k=
    plain = handle.forward({**batch, "text.target_ids": targets})
    assert set(plain) == {"text.target_logprobs"}


def test_the_exposure_record_counts_positions_times_k(llama: str) -> None:
    handle = graytune.open_backbone(llama, "black-box", top_k=5)
    batch = handle.tokenize(TEXTS)
    positions = int(batch["text.attention_mask"].sum())
    handle.forward(batch, outputs=[], top_k=5)
    handle.forward(batch, outputs=[], top_k=2)
    assert handle.exposure.top_k == {"calls": 2, "positions": 2 * positions, "values": 7 * positions}
    assert handle.exposure.to_dict()["top_k"]["values"] == 7 * positions
    assert set(handle.exposure.ports[TOP_LOGPROBS]) == {"read"}


def test_refused_without_the_grant_naming_what_to_do(llama: str) -> None:
    handle = graytune.open_backbone(llama, "light-gray")
    assert handle.top_k_grant == 0
    with pytest.raises(AccessDeniedError) as err:
        handle.forward(handle.tokenize(TEXTS), outputs=[], top_k=1)
    text = str(err.value)
    assert "top_k=1 was asked" in text and "no top-k grant" in text and "--grant-topk 1" in text
    assert handle.exposure.top_k["calls"] == 0


def test_refused_above_the_grant_naming_the_grant(llama: str) -> None:
    handle = graytune.open_backbone(llama, "black-box", top_k=3)
    with pytest.raises(AccessDeniedError) as err:
        handle.forward(handle.tokenize(TEXTS), outputs=[], top_k=4)
    text = str(err.value)
    assert "top_k=4 was asked" in text and "a top-k grant of 3" in text and "ask for top_k <= 3" in text
    assert handle.at_level(graytune.AccessLevel.BLACK_BOX).top_k_grant == 3  # a lower level keeps the grant


@pytest.mark.parametrize("asked", [0.5, -1, True, "3"])
def test_a_top_k_that_is_no_count_is_refused(llama: str, asked: object) -> None:
    handle = graytune.open_backbone(llama, "black-box", top_k=3)
    with pytest.raises(InvalidInputError, match="whole number"):
        handle.forward(handle.tokenize(TEXTS), outputs=[], top_k=asked)  # type: ignore[arg-type]


def test_top_k_outputs_are_asked_with_top_k_only(llama: str) -> None:
    handle = graytune.open_backbone(llama, "black-box", top_k=3)
    batch = handle.tokenize(TEXTS)
    for kwargs in ({"reads": [TOP_IDS]}, {"outputs": [TOP_LOGPROBS]}):
        with pytest.raises(InvalidInputError, match="top_k=k"):
            handle.forward(batch, **kwargs)  # type: ignore[arg-type]


def test_grants_are_bounded_and_only_for_language_models(llama: str) -> None:
    with pytest.raises(InvalidInputError, match=f"from 0 \\(none\\) to {MAX_TOP_K}"):
        graytune.open_backbone(llama, "black-box", top_k=MAX_TOP_K + 1)
    with pytest.raises(InvalidInputError, match="language models"):
        graytune.open_backbone("minilm", "black-box", top_k=2)


def test_graytune_info_names_the_grant_and_what_it_reveals(llama: str) -> None:
    from graytune.cli.info import reveals

    rows = {operation: (level, here, what) for level, here, operation, what in
            reveals(graytune.open_backbone(llama, "black-box").spec, graytune.AccessLevel.BLACK_BOX)[1:]}
    level, here, what = rows["top_k=k: text.top_ids, text.top_logprobs"]
    assert (level, here) == ("grant", "grant") and what.startswith("k values of the next-token distribution")
    encoder = reveals(graytune.open_backbone("minilm", "black-box").spec, graytune.AccessLevel.BLACK_BOX)
    assert not any("top_k" in r[2] for r in encoder)
