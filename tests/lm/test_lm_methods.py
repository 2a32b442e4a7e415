"""Every method the registry lends to language models, on a tiny random Llama behind the boundary.

One table drives the generic checks (as PEFT's custom-model tests do): the model builds at its
level, a step of training changes only adapter tensors, the backbone's weights stay bit-identical,
the artifact round-trips exactly, and the loss is the completion tokens' mean NLL of plain
transformers autograd when nothing is adapted.
"""

from __future__ import annotations

import pytest
import torch

import graytune
from graytune import InvalidInputError
from graytune.data.completions import Completions
from graytune.methods import METHODS
from graytune.model import AdaptedModel
from graytune.recipes.run import open_for
from graytune.train.completions import IGNORE, CompletionTask
from graytune.train.config import TrainConfig
from graytune.train.loop import fit
from tests.backbones.tiny_causal import build_tiny_causal

LM_METHODS = sorted(name for name, m in METHODS.items() if "causal-lm" in m.backbones)
OPTIONS = {"prompt": {"extra_tokens": 2}, "lga": {"tokens": 1}, "lga-deep": {"tokens": 1}, "adalink": {"rank": 2},
           "lora": {"rank": 2, "alpha": 4}, "prompt-zo": {"extra_tokens": 2}}
DATA = Completions("tiny", ("the cat", "a dog", "the dog", "a cat", "the cat sat", "a dog ran", "the", "a"),
                   (" sat", " ran", " sat", " ran", " on", " off", " cat", " dog"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"hf-causal:{build_tiny_causal(tmp_path_factory.mktemp('llama'), 'llama')}"


def test_the_table_holds_every_lm_method() -> None:
    assert LM_METHODS == ["adalink", "dga", "full", "lga", "lga-deep", "lora", "prompt", "prompt-zo", "zero-shot"]


@pytest.mark.parametrize("method", LM_METHODS)
def test_a_step_changes_only_adapter_tensors_and_round_trips(llama: str, method: str, tmp_path) -> None:
    handle = open_for(llama, None, method)
    weights = {k: v.clone() for k, v in graytune.open_backbone(llama, "white-box").module().state_dict().items()}
    model = AdaptedModel.build(handle, method, OPTIONS.get(method))
    task = CompletionTask(DATA, handle)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if method != "zero-shot":
        fit(model, task, DATA, TrainConfig(lr=1e-2, max_steps=2, batch_size=4, eval_every=2), progress=False)
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed, f"{method}: training changed nothing"
    owner = graytune.open_backbone(llama, "white-box").module().state_dict()
    assert all(torch.equal(owner[k], weights[k]) for k in weights)  # the hidden weights never move
    assert all(not k.startswith("backbone_module.") or method in ("lora", "full") for k in model.adapter_state())
    folder = model.save_pretrained(tmp_path / method)
    loaded = AdaptedModel.from_pretrained(folder, open_for(llama, None, method))
    batch = task.collate(task.rows[:3])
    torch.testing.assert_close(loaded.target_logprobs(batch), model.target_logprobs(batch), rtol=0, atol=1e-6)


def test_the_loss_is_plain_autograd_nll_of_the_completion_tokens(llama: str) -> None:
    from transformers import AutoModelForCausalLM

    handle = graytune.open_backbone(llama, "dark-gray")
    task = CompletionTask(DATA, handle)
    batch = task.collate(task.rows[:4])
    shift = torch.zeros(1, 1, 32, requires_grad=True)
    model = AdaptedModel.build(handle, "zero-shot")
    loss = task.loss(model, batch)
    reference = AutoModelForCausalLM.from_pretrained(llama.split(":", 1)[1]).eval()
    logits = reference(input_ids=batch["text.input_ids"], attention_mask=batch["text.attention_mask"]).logits
    targets = batch["text.target_ids"]
    keep = targets != IGNORE
    expected = -logits.log_softmax(-1)[keep].gather(1, targets[keep].unsqueeze(1)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    out = handle.forward(dict(batch), add={"text.token_embeds": shift}, outputs=["text.target_logprobs"])
    out["text.target_logprobs"].sum().backward()
    assert shift.grad is not None and shift.grad.abs().sum() > 0


def test_targets_start_where_the_prompt_ends_and_the_end_token_is_learnt(llama: str) -> None:
    handle = graytune.open_backbone(llama, "dark-gray")
    task = CompletionTask(DATA, handle)
    ids, n_prompt = task.rows[0]
    prompt = handle.tokenize(["the cat"])["text.input_ids"][0].tolist()
    assert ids[:n_prompt] == prompt and ids[-1] == task.eos_id
    batch = task.collate([task.rows[0], task.rows[6]])
    targets = batch["text.target_ids"][0]
    assert (targets[:n_prompt - 1] == IGNORE).all() and targets[n_prompt - 1:len(ids) - 1].tolist() == ids[n_prompt:]


def test_methods_refuse_the_wrong_kind_of_backbone_naming_those_that_fit(llama: str) -> None:
    handle = graytune.open_backbone(llama, "dark-gray")
    with pytest.raises(InvalidInputError, match=r"method 'output' adapts encoders.*causal-lm, whose methods are "
                                                r"zero-shot, dga, prompt"):
        AdaptedModel.build(handle, "output")


def test_data_and_backbone_kinds_must_agree(llama: str) -> None:
    from graytune.data.catalog import load_splits
    from graytune.recipes.run import make_task

    handle = graytune.open_backbone(llama, "dark-gray")
    with pytest.raises(InvalidInputError, match="wordnet-supersense is classification data and .* is a language "
                                                "model: language models train on prompt/completion data"):
        make_task(load_splits("wordnet-supersense"), handle, None)


def test_inserted_tokens_start_random_on_a_language_model_and_zero_on_an_encoder(llama: str, tiny_clip_dir) -> None:
    """A zero token stays zero through a pre-norm decoder and each RMSNorm scales its gradient by 1/sqrt(eps):
    on SmolLM2's 30 layers that overflows to NaN, so LM tokens start at N(0, 0.02²); encoders keep zeros."""
    lm = AdaptedModel.build(open_for(llama, None, "prompt"), "prompt")
    encoder = AdaptedModel.build(open_for(f"hf-clip:{tiny_clip_dir}", None, "prompt"), "prompt")
    assert lm.text_adapters[0].extra.abs().sum() > 0 and 0.005 < float(lm.text_adapters[0].extra.std()) < 0.05
    assert encoder.text_adapters[0].extra.abs().sum() == 0
    zeros = AdaptedModel.build(open_for(llama, None, "prompt"), "prompt", {"init": "zeros"})
    assert zeros.text_adapters[0].extra.abs().sum() == 0


@pytest.mark.slow
def test_a_soft_prompt_trains_on_smollm2_with_finite_gradients() -> None:
    from graytune.data.catalog import load_splits
    from graytune.recipes.run import make_task

    splits = load_splits("wordnet-category", train_size=8)
    handle = open_for("smollm2-135m", None, "prompt")
    model = AdaptedModel.build(handle, "prompt")
    task = make_task(splits, handle, None)
    loss = task.loss(model, next(task.batches(4, torch.Generator().manual_seed(0))))
    loss.backward()
    grad = model.text_adapters[0].extra.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0
