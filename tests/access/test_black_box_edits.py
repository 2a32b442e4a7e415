"""The in-process handle records black-box edits (add/insert at an input port, no gradient asked) in its exposure,
and an artifact trained zeroth-order says it used them."""

from __future__ import annotations

import json

import pytest
import torch

import graytune
from graytune.data.completions import Completions
from graytune.model import AdaptedModel
from graytune.train.completions import CompletionTask
from graytune.train.config import TrainConfig
from graytune.train.loop import fit
from tests.backbones.tiny_causal import DIM, build_tiny_causal

DATA = Completions("tiny", ("the cat", "a dog", "the dog"), (" sat", " ran", " sat"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"hf-causal:{build_tiny_causal(tmp_path_factory.mktemp('llama'), 'llama')}"


def test_black_box_edits_are_recorded_by_port_in_calls_and_rows(llama: str) -> None:
    handle = graytune.open_backbone(llama, "black-box")
    batch = handle.tokenize(["the cat", "the cat", "the cat", "the cat"])
    edits = torch.zeros(4, 1, DIM)
    edits[torch.arange(4), 0, torch.arange(4)] = torch.tensor([1e-2, -1e-2, 1e-2, -1e-2])  # a finite-difference batch
    handle.forward(dict(batch), add={"text.token_embeds": edits}, outputs=[], reads=[])
    handle.forward(dict(batch), outputs=[], reads=[])  # no edit: nothing recorded
    handle.generate({"text": ["the cat"]}, insert={"text.token_embeds": torch.zeros(1, 2, DIM)},
                    settings={"max_new_tokens": 1})
    assert handle.exposure.black_box_edits == {"calls": 2, "rows": 5, "ports": {"text.token_embeds": 5}}
    assert handle.exposure.to_dict()["black_box_edits"]["calls"] == 2
    gray = graytune.open_backbone(llama, "dark-gray")  # from dark-gray up the level itself gives exact VJPs
    gray.forward(dict(batch), add={"text.token_embeds": edits}, outputs=[], reads=[])
    assert gray.exposure.black_box_edits == {"calls": 0, "rows": 0, "ports": {}}


def test_an_artifact_trained_by_prompt_zo_says_it_used_black_box_edits(llama: str, tmp_path) -> None:
    handle = graytune.open_backbone(llama, "black-box")
    model = AdaptedModel.build(handle, "prompt-zo", {"extra_tokens": 2})
    fit(model, CompletionTask(DATA, handle), DATA, TrainConfig(lr=1e-2, max_steps=1, batch_size=3, eval_every=1,
                                                               zo="spsa", zo_q=1), progress=False)
    folder = model.save_pretrained(tmp_path / "zo")
    recorded = json.loads((folder / "adapter_config.json").read_text())["exposure"]
    assert recorded["access"] == "black-box" and recorded["gradient_queries"] == 0
    edits = recorded["black_box_edits"]
    assert edits["calls"] >= 2 and edits["ports"] == {"text.token_embeds": edits["rows"]} and edits["rows"] >= 6


def test_graytune_info_says_what_each_level_reveals(llama: str, capsys) -> None:
    from graytune.cli.info import reveals
    from graytune.cli.main import main

    assert main(["info", llama, "--access", "black-box"]) == 0
    out = capsys.readouterr().out
    assert "what each operation reveals" in out and "--black-box-edits" in out and "sampled tokens" in out
    rows = {(level, operation): (here, what) for level, here, operation, what in
            reveals(graytune.open_backbone(llama, "dark-gray").spec, graytune.AccessLevel.DARK_GRAY)[1:]}
    assert rows[("black-box", "add/insert at text.token_embeds")] == (
        "yes", "Jacobian columns by finite differences; the owner's grant (graytune serve --black-box-edits)")
    assert rows[("black-box", "text.target_logprobs")][1].startswith("log-probs of the targets sent")
    assert rows[("dark-gray", "add/insert at input ports, gradients")] == ("yes", "exact VJPs at the input ports")
    assert rows[("light-gray", "add/insert at entry ports, gradients")][0] == "no"
    assert rows[("read", "read at text.token_embeds")][0] == "grant"
    assert not any("pixels" in operation for _, operation in rows)  # a language model has no pixels
    pixels = reveals(graytune.open_backbone("efficientnet-lite0", "black-box").spec, graytune.AccessLevel.BLACK_BOX)
    assert [r for r in pixels if "pixels" in r[2]][0][3].endswith("inherent (pixels are continuous)")
    assert not any("token_embeds" in r[2] or "generate" in r[2] for r in pixels)
