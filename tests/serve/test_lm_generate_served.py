"""Generation over the network (POST /v1/generate) equals generation in process; tokens are a quota."""

from __future__ import annotations

import httpx
import pytest
import torch

import graytune
from graytune.access.generation import pack_generate
from graytune.access.wire import encode
from graytune.errors import InvalidInputError, RemoteError
from graytune.types import GenerationSettings
from tests.backbones.tiny_causal import DIM, build_tiny_causal
from tests.serve.conftest import ALICE, BOB

PROMPT = "the cat sat"
SETTINGS = GenerationSettings(max_new_tokens=5, stop_at_eos=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"hf-causal:{build_tiny_causal(tmp_path_factory.mktemp('llama'), 'llama', seed=1)}"


def _edits() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    return {"add": {"text.token_embeds": 0.5 * torch.randn(1, 1, DIM, generator=g)},
            "insert": {"text.token_embeds": torch.randn(1, 2, DIM, generator=g)},
            "maps": {"text.token_embeds": {"down": 0.3 * torch.randn(3, DIM, generator=g),
                                           "up": 0.3 * torch.randn(DIM, 3, generator=g)}}}


def test_a_served_generation_equals_the_in_process_one(serve, llama: str) -> None:
    local = graytune.open_backbone(llama, "dark-gray", reads=["text.token_embeds"])
    url, _ = serve(handle=local, access="dark-gray", reads=("text.token_embeds",))
    remote = graytune.open_backbone(url, "dark-gray", reads=["text.token_embeds"], api_key=ALICE)
    for prompts, settings in (([PROMPT], SETTINGS), ([PROMPT, "a dog"], {"max_new_tokens": 6, "temperature": 1.3,
                                                                         "top_p": 0.9, "seed": 4})):
        want = local.generate({"text": prompts}, settings=settings, **_edits())
        got = remote.generate({"text": prompts}, settings=settings, **_edits())
        assert torch.equal(got.ids, want.ids) and torch.equal(got.lengths, want.lengths) and got.texts == want.texts
    streamed: dict[str, list[list[str]]] = {"local": [], "remote": []}
    for where, handle in (("local", local), ("remote", remote)):
        last = handle.generate({"text": [PROMPT]}, settings=SETTINGS, stream=streamed[where].append, **_edits())
    assert streamed["remote"] == streamed["local"] and len(streamed["remote"]) == 5  # a line per token, as it came
    assert streamed["remote"][-1] == last.texts
    assert remote.exposure.generated_tokens == 5 + int(want.lengths.sum()) + 5
    assert remote.exposure.ports["text.token_embeds"] == {"add", "insert", "read"}  # the map is a read


def test_tokens_are_charged_and_refused_past_the_quota(serve, llama: str) -> None:
    local = graytune.open_backbone(llama, "black-box")
    url, _ = serve(handle=local, access="black-box", reads=(), quota_tokens=40, max_new_tokens=8)
    remote = graytune.open_backbone(url, "black-box", api_key=ALICE)
    ids = remote.tokenize([PROMPT, "a dog"])
    prompt_tokens = int(ids["text.attention_mask"].sum())
    out = remote.generate(dict(ids), settings={"max_new_tokens": 4})  # reserves 2 x 4, keeps what it generated
    used = prompt_tokens + int(out.lengths.sum())
    assert remote.stats()["tokens_used"] == used and remote.stats()["quota_tokens"] == 40
    targets = torch.full_like(ids["text.input_ids"], -100)
    remote.forward({**ids, "text.target_ids": targets})  # a forward pays its real tokens
    used += prompt_tokens
    assert remote.stats()["tokens_used"] == used
    with pytest.raises(RemoteError, match="token quota of 40 reached.*--quota-tokens") as err:
        remote.generate(dict(ids), settings={"max_new_tokens": 8})  # its reservation passes the quota
    assert err.value.status == 429 and remote.stats()["tokens_used"] == used  # nothing charged for it
    assert remote.stats()["samples_used"] == 4
    other = graytune.open_backbone(url, "black-box", api_key=BOB)  # a quota per client
    assert other.generate({"text": [PROMPT]}, settings={"max_new_tokens": 2}).lengths.tolist() == [2]


def test_bad_settings_and_sizes_are_refused_before_any_work(serve, llama: str) -> None:
    local = graytune.open_backbone(llama, "dark-gray")
    url, app = serve(handle=local, access="dark-gray", reads=(), max_new_tokens=16)
    remote = graytune.open_backbone(url, "dark-gray", api_key=ALICE)
    with torch.no_grad():
        plan = local.check({"text": [PROMPT]}, outputs=[])
    headers = {"Authorization": f"Bearer {ALICE}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        good = pack_generate(plan, "dark-gray", {}, GenerationSettings(max_new_tokens=2, stop_at_eos=False))
        assert client.post("/v1/generate", content=good).status_code == 200
        for settings, words in (({"temperature": -1}, "temperature must be from 0"),
                                ({"beams": 2}, "unknown generation settings ['beams']"),
                                ({"stop_at_eos": "no"}, "stop_at_eos must be true or false"),
                                ("greedy", "generation settings must be an object")):
            tensors = {"inputs/text.input_ids": plan.inputs["text.input_ids"]}
            answer = client.post("/v1/generate", content=encode(tensors, {"settings": settings}))
            assert answer.status_code == 400 and words in answer.json()["detail"], answer.json()
        too_many = pack_generate(plan, "dark-gray", {}, GenerationSettings(max_new_tokens=17))
        answer = client.post("/v1/generate", content=too_many)
        assert answer.status_code == 413 and "--max-new-tokens" in answer.json()["detail"]
    assert remote.stats()["samples_used"] == 1  # only the good request was charged
    with pytest.raises(InvalidInputError, match="max_new_tokens must be a whole number"):  # checked before sending
        remote.generate({"text": [PROMPT]}, settings={"max_new_tokens": 0})
    with pytest.raises(InvalidInputError, match="context of 64 positions"):  # the owner's own refusal, streamed too
        remote.generate({"text": [PROMPT]}, settings={"max_new_tokens": 16, "stop_at_eos": False},
                        insert={"text.token_embeds": torch.zeros(1, 50, DIM)}, stream=lambda texts: None)
    prompt_tokens = int(plan.inputs["text.attention_mask"].sum())
    assert app.state.service.ledger.used("alice")["tokens"] == prompt_tokens + 2  # the context refusal was refunded


def test_an_encoder_server_cannot_generate(serve) -> None:
    url, _ = serve(access="dark-gray", reads=())
    with pytest.raises(InvalidInputError, match="minilm is not a language model"):
        graytune.open_backbone(url, "dark-gray", api_key=ALICE).generate({"text": ["a cat"]})
