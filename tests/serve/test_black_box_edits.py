"""Edits at input ports from black-box clients (what finite differences need) are refused, counted or allowed as the
owner's --black-box-edits says; a zeroth-order run against a refusing server fails at its first step, naming it."""

from __future__ import annotations

import json

import pytest
import torch

import graytune
from graytune.cli.main import build_parser, main
from graytune.errors import InvalidInputError, RemoteError
from graytune.serve import ApiKeys, ServeConfig, create_app
from tests.backbones.tiny_causal import build_tiny_causal
from tests.serve.conftest import ALICE, BOB, KEYS

PAIRS = 4  # Jacobian columns asked for: 2 x PAIRS rows


def _finite_differences(handle, text: str = "a cat", eps: float = 1e-2) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Columns 0..PAIRS-1 of the Jacobian of text.embeds at a shift, from one forward of copies of one text."""
    edits = torch.zeros(2 * PAIRS, 1, 384)
    edits[torch.arange(PAIRS), 0, torch.arange(PAIRS)] = eps
    edits[PAIRS + torch.arange(PAIRS), 0, torch.arange(PAIRS)] = -eps
    with torch.no_grad():
        out = handle.forward({"text": [text] * (2 * PAIRS)}, add={"text.token_embeds": edits})["text.embeds"]
    return (out[:PAIRS] - out[PAIRS:]) / (2 * eps)  # [PAIRS, E]


def test_refuse_answers_403_naming_the_flag_before_any_charge(serve) -> None:
    url, app = serve(access="black-box", reads=(), black_box_edits="refuse")
    remote = graytune.open_backbone(url, "black-box", api_key=ALICE)
    with pytest.raises(RemoteError) as err:
        _finite_differences(remote)
    assert err.value.status == 403 and err.value.kind == "black_box_edits"
    assert "--black-box-edits refuse" in str(err.value) and "text.token_embeds" in str(err.value)
    assert "zero-shot" in str(err.value) and remote.stats()["samples_used"] == 0  # refused before any charge or run
    with torch.no_grad():  # a shared edit over distinct texts (what zeroth-order training sends) is refused too
        with pytest.raises(RemoteError, match="black_box_edits"):
            remote.forward({"text": ["a cat", "a dog"]}, add={"text.token_embeds": torch.zeros(1, 1, 384)})
        assert remote.forward({"text": ["a cat"] * 4})["text.embeds"].shape == (4, 384)  # raw inputs are served
    assert remote.stats()["black_box_edits_policy"] == "refuse" and app.state.service.ledger.all_edits() == {}


def test_count_serves_the_columns_and_records_the_batch(serve, minilm) -> None:
    url, app = serve(access="black-box", reads=())
    remote = graytune.open_backbone(url, "black-box", api_key=ALICE)
    got = _finite_differences(remote)
    want = _finite_differences(minilm.at_level(graytune.AccessLevel.BLACK_BOX))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.abs().sum(1).min() > 0  # distinct Jacobian columns, from forwards alone
    stats = remote.stats()
    assert stats["black_box_edits_policy"] == "count"
    assert (stats["black_box_edit_calls"], stats["black_box_edit_rows"]) == (1, 2 * PAIRS)
    assert (stats["same_input_edit_batches"], stats["same_input_edit_rows"]) == (1, 2 * PAIRS - 1)
    assert remote.exposure.black_box_edits == {"calls": 1, "rows": 2 * PAIRS, "ports": {"text.token_embeds": 8}}
    with torch.no_grad():  # distinct texts under one shared edit: an edit call, not a finite-difference batch
        remote.forward({"text": ["a cat", "a dog", "a cat"]}, add={"text.token_embeds": torch.ones(1, 1, 384)})
    stats = remote.stats()
    assert (stats["black_box_edit_calls"], stats["black_box_edit_rows"], stats["same_input_edit_batches"]) == (2, 11, 1)
    assert graytune.open_backbone(url, "black-box", api_key=BOB).stats()["black_box_edit_calls"] == 0
    assert app.state.service.stats("alice")["same_input_edit_rows"] == 2 * PAIRS - 1


def test_allow_serves_without_recording_and_gradient_levels_are_not_concerned(serve) -> None:
    url, app = serve(access="black-box", reads=(), black_box_edits="allow")
    remote = graytune.open_backbone(url, "black-box", api_key=ALICE)
    assert _finite_differences(remote).abs().sum() > 0
    assert remote.stats()["black_box_edit_calls"] == 0 and app.state.service.ledger.all_edits() == {}
    url, app = serve(access="dark-gray", reads=(), black_box_edits="refuse")  # dark-gray: the exact VJP is allowed
    for level in ("black-box", "dark-gray"):
        assert _finite_differences(graytune.open_backbone(url, level, api_key=ALICE)).abs().sum() > 0
    assert app.state.service.ledger.all_edits() == {}


def test_an_unknown_policy_is_refused(minilm) -> None:
    with pytest.raises(InvalidInputError, match="--black-box-edits is 'drop'; choose one of allow, count, refuse"):
        create_app(minilm, ServeConfig(black_box_edits="drop"), ApiKeys(KEYS))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "minilm", "--api-keys", "k.txt", "--black-box-edits", "drop"])
    assert build_parser().parse_args(["serve", "minilm", "--api-keys", "k.txt"]).black_box_edits == "count"


def test_prompt_zo_against_a_refusing_server_fails_at_its_first_step(serve, tmp_path, capsys, monkeypatch) -> None:
    llama = graytune.open_backbone(f"hf-causal:{build_tiny_causal(tmp_path / 'llama', 'llama')}", "black-box")
    url, app = serve(handle=llama, access="black-box", reads=(), black_box_edits="refuse")
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"the cat {i}", "completion": " sat"}) + "\n" for i in range(12)))
    monkeypatch.setenv("GRAYTUNE_API_KEY", ALICE)
    code = main(["train", "--backbone", url, "--data", str(data), "--method", "prompt-zo", "--out",
                 str(tmp_path / "out"), "--max-steps", "2", "--batch-size", "4"])
    error = capsys.readouterr().err
    assert code == 2 and "--black-box-edits refuse" in error and "prompt-zo" in error, error
    assert app.state.service.stats("alice")["samples_used"] == 0
    assert not (tmp_path / "out" / "adapter_config.json").exists()
