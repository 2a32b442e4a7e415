"""A language model served: target log-probs and VJPs at input and entry ports equal the in-process ones; top-k
log-probabilities equal them within the owner's grant and are refused past it."""

from __future__ import annotations

import httpx
import pytest
import torch

import graytune
from graytune import AccessDeniedError, InvalidInputError
from graytune.data.completions import Completions
from graytune.model import AdaptedModel
from graytune.train.completions import CompletionTask
from tests.backbones.tiny_causal import DIM, build_tiny_causal
from tests.serve.conftest import ALICE

DATA = Completions("tiny", ("the cat", "a dog", "the dog"), (" sat", " ran", " sat"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"hf-causal:{build_tiny_causal(tmp_path_factory.mktemp('llama'), 'llama')}"


def _step(handle, batch):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    shift = (0.1 * torch.randn(1, 1, DIM, generator=g)).requires_grad_()
    prefix = (0.1 * torch.randn(1, 2, DIM, generator=g)).requires_grad_()
    inner = (0.1 * torch.randn(1, 1, DIM, generator=g)).requires_grad_()
    out = handle.forward(dict(batch), add={"text.token_embeds": shift}, outputs=["text.target_logprobs"],
                         insert={"text.token_embeds": prefix, "text.layer.1": inner})["text.target_logprobs"]
    (-out.sum()).backward()
    return out.detach(), [shift.grad, prefix.grad, inner.grad]


def test_served_target_logprobs_and_vjps_equal_in_process(serve, llama: str) -> None:
    local = graytune.open_backbone(llama, "light-gray")
    url, _ = serve(handle=local, access="light-gray", reads=())
    remote = graytune.open_backbone(url, "light-gray", api_key=ALICE)
    batch = CompletionTask(DATA, local).collate(CompletionTask(DATA, local).rows)
    out_local, grads_local = _step(local, batch)
    out_remote, grads_remote = _step(remote, batch)
    torch.testing.assert_close(out_remote, out_local, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_remote, grads_local):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_remote_training_of_a_soft_prompt_equals_in_process(serve, llama: str) -> None:
    from graytune.train.config import TrainConfig
    from graytune.train.loop import fit, seed_everything

    local = graytune.open_backbone(llama, "dark-gray")
    url, _ = serve(handle=local, access="dark-gray", reads=())
    trained = {}
    for where, handle in (("local", local), ("remote", graytune.open_backbone(url, "dark-gray", api_key=ALICE))):
        seed_everything(0)
        model = AdaptedModel.build(handle, "prompt", {"extra_tokens": 2})
        task = CompletionTask(DATA, handle)
        fit(model, task, DATA, TrainConfig(lr=1e-2, max_steps=3, batch_size=3, eval_every=3), progress=False)
        trained[where] = model.text_adapters[0].extra.detach().clone()
    torch.testing.assert_close(trained["remote"], trained["local"], rtol=1e-5, atol=1e-6)


def test_served_top_k_equals_in_process_and_is_bounded_by_the_grant(serve, llama: str) -> None:
    local = graytune.open_backbone(llama, "black-box", top_k=3)
    url, _ = serve(handle=local, access="black-box", reads=())
    assert httpx.get(f"{url}/v1/spec", headers={"Authorization": f"Bearer {ALICE}"}).json()["top_k"] == 3
    remote = graytune.open_backbone(url, "black-box", api_key=ALICE, top_k=3)
    batch = local.tokenize(["the cat sat", "a dog"])
    served, here = remote.forward(batch, outputs=[], top_k=2), local.forward(batch, outputs=[], top_k=2)
    assert torch.equal(served["text.top_ids"], here["text.top_ids"])
    torch.testing.assert_close(served["text.top_logprobs"], here["text.top_logprobs"], rtol=1e-6, atol=1e-6)
    positions = int(batch["text.attention_mask"].sum())
    assert remote.exposure.top_k == {"calls": 1, "positions": positions, "values": 2 * positions}
    with pytest.raises(AccessDeniedError, match="top_k=4 was asked"):
        remote.forward(batch, outputs=[], top_k=4)  # the client's own check
    with pytest.raises(AccessDeniedError, match="top_k=5 was asked.*a top-k grant of 3"):
        graytune.open_backbone(url, "black-box", api_key=ALICE, top_k=5)
    # the server checks too: a request past the client's check gets 403 naming the grant
    asked = _raw_forward(url, llama, batch, top_k=4)
    assert asked.status_code == 403 and "top_k=4 was asked" in asked.json()["detail"]
    assert "a top-k grant of 3" in asked.json()["detail"] and "--grant-topk 4" in asked.json()["detail"]


def test_a_server_without_the_grant_refuses_top_k(serve, llama: str) -> None:
    local = graytune.open_backbone(llama, "black-box")
    url, _ = serve(handle=local, access="black-box", reads=())
    with pytest.raises(AccessDeniedError, match="no top-k grant"):
        graytune.open_backbone(url, "black-box", api_key=ALICE, top_k=1)
    asked = _raw_forward(url, llama, local.tokenize(["a dog"]), top_k=1)
    assert asked.status_code == 403 and "no top-k grant" in asked.json()["detail"]


def test_serve_takes_the_top_k_grant_as_a_flag(llama: str) -> None:
    from graytune.cli.main import build_parser
    from graytune.serve.config import ApiKeys, ServeConfig
    from graytune.serve.runner import build_app

    args = build_parser().parse_args(["serve", llama, "--api-keys", "k.txt", "--grant-topk", "5"])
    assert args.grant_topk == 5
    app = build_app(llama, ServeConfig(access="black-box", grant_topk=5), ApiKeys({"alice": ALICE}))
    assert app.state.service.handle.top_k_grant == 5
    with pytest.raises(InvalidInputError, match="from 0 \\(none\\) to 20"):
        build_app(llama, ServeConfig(access="black-box", grant_topk=21), ApiKeys({"alice": ALICE}))


def _raw_forward(url: str, llama: str, batch: dict[str, torch.Tensor], top_k: int) -> httpx.Response:
    """A forward asking ``top_k`` sent as bytes, past any client-side check."""
    from graytune.access.wire import pack_call

    plan = graytune.open_backbone(llama, "black-box", top_k=top_k).check(batch, outputs=[], top_k=top_k)
    return httpx.post(f"{url}/v1/forward", content=pack_call(plan, "black-box"),
                      headers={"Authorization": f"Bearer {ALICE}"})
