"""Duplicate-row gradient batches (one call, E copies of an input, E one-hot output gradients: a whole Jacobian)
are served and counted, served, or refused, as the owner's --duplicate-rows says."""

from __future__ import annotations

import pytest
import torch

import graytune
from graytune.cli.main import build_parser
from graytune.errors import InvalidInputError, RemoteError
from graytune.serve import ApiKeys, ServeConfig, create_app
from graytune.serve.admission import repeated_rows
from tests.serve.conftest import ALICE, BOB, KEYS

ROWS = 4


def _jacobian_rows(handle, texts):  # type: ignore[no-untyped-def]
    """Rows 0..ROWS-1 of the Jacobian of text.embeds at a per-row shift, from one forward and one VJP."""
    shift = torch.zeros(len(texts), 1, 384, requires_grad=True)
    z = handle.forward({"text": texts}, add={"text.token_embeds": shift})["text.embeds"]
    z.backward(torch.eye(ROWS, 384))
    return shift.grad[:, 0]  # [ROWS, 384]


def test_repeated_rows_finds_exact_repeats_only() -> None:
    ids = torch.tensor([[1, 2], [3, 4], [1, 2], [1, 2]])
    assert repeated_rows(4, [ids]) == {2: 0, 3: 0}
    edits = torch.tensor([[0.0], [0.0], [-0.0], [1e-7]])  # -0.0 is 0.0; any other difference is a distinct row
    assert repeated_rows(4, [ids, edits]) == {2: 0}
    assert repeated_rows(2, [torch.tensor([[5], [6]])]) == {}


def test_count_serves_the_jacobian_and_records_it(serve, minilm) -> None:
    url, app = serve(access="dark-gray", reads=())
    remote = graytune.open_backbone(url, "dark-gray", api_key=ALICE)
    got = _jacobian_rows(remote, ["a cat"] * ROWS)
    want = _jacobian_rows(minilm.at_level(graytune.AccessLevel.DARK_GRAY), ["a cat"] * ROWS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # the batch gave 4 distinct Jacobian rows
    assert got.abs().sum(1).min() > 0 and not torch.allclose(got[0], got[1])
    stats = remote.stats()
    assert (stats["duplicate_row_batches"], stats["duplicate_rows"], stats["duplicate_rows_policy"]) == (1, 3, "count")
    # distinct rows, and duplicate rows without gradients, are not counted; another client sees only its own
    _jacobian_rows(remote, ["a cat", "a dog", "a bird", "a fish"])
    with torch.no_grad():
        remote.forward({"text": ["a cat"] * ROWS})
    assert remote.stats()["duplicate_row_batches"] == 1
    assert graytune.open_backbone(url, "dark-gray", api_key=BOB).stats()["duplicate_row_batches"] == 0
    assert app.state.service.ledger.all_duplicates() == {"alice": {"batches": 1, "rows": 3}}


def test_refuse_answers_403_naming_the_rows_and_the_flag(serve) -> None:
    url, app = serve(access="dark-gray", reads=(), duplicate_rows="refuse")
    remote = graytune.open_backbone(url, "dark-gray", api_key=ALICE)
    with pytest.raises(RemoteError) as err:
        _jacobian_rows(remote, ["a cat"] * ROWS)
    assert err.value.status == 403 and err.value.kind == "duplicate_rows"
    assert "3 of them repeat an earlier row" in str(err.value) and "--duplicate-rows refuse" in str(err.value)
    assert remote.stats()["samples_used"] == 0  # refused before anything was charged or run
    _jacobian_rows(remote, ["a cat", "a dog", "a bird", "a fish"])  # distinct rows are served
    with torch.no_grad():  # and so are repeated rows that ask for no gradient
        remote.forward({"text": ["a cat"] * ROWS})
    assert app.state.service.ledger.all_duplicates() == {}


def test_allow_serves_without_counting(serve) -> None:
    url, app = serve(access="dark-gray", reads=(), duplicate_rows="allow")
    remote = graytune.open_backbone(url, "dark-gray", api_key=ALICE)
    assert _jacobian_rows(remote, ["a cat"] * ROWS).abs().sum() > 0
    assert remote.stats()["duplicate_row_batches"] == 0 and app.state.service.ledger.all_duplicates() == {}


def test_an_unknown_policy_is_refused(minilm) -> None:
    with pytest.raises(InvalidInputError, match="--duplicate-rows is 'drop'; choose one of allow, count, refuse"):
        create_app(minilm, ServeConfig(duplicate_rows="drop"), ApiKeys(KEYS))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "minilm", "--api-keys", "k.txt", "--duplicate-rows", "drop"])
    args = build_parser().parse_args(["serve", "minilm", "--api-keys", "k.txt", "--duplicate-rows", "refuse"])
    assert args.duplicate_rows == "refuse"
