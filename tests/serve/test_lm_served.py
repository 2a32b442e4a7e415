"""A language model served: target log-probs and VJPs at input and entry ports equal the in-process ones."""

from __future__ import annotations

import pytest
import torch

import graytune
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
