"""Bad input gets a clear error that says what was received and what is allowed."""

from __future__ import annotations

import pytest
import torch

import graytune
from graytune import AccessDeniedError, InvalidInputError, UnknownNameError


@pytest.fixture(scope="module")
def eff():  # type: ignore[no-untyped-def]
    return graytune.open_backbone("efficientnet-lite0", access="dark-gray")


@pytest.fixture(scope="module")
def text():  # type: ignore[no-untyped-def]
    return graytune.open_backbone("minilm", access="dark-gray")


def test_unknown_backbone_suggests_the_closest_ids() -> None:
    with pytest.raises(UnknownNameError) as err:
        graytune.open_backbone("efficientnet-lite")
    assert "efficientnet-lite0" in err.value.suggestions and "known:" in str(err.value)
    with pytest.raises(UnknownNameError, match="did you mean 'minilm'"):
        graytune.open_backbone("minilmm")


def test_unknown_level_lists_the_levels() -> None:
    with pytest.raises(UnknownNameError, match="dark-gray"):
        graytune.open_backbone("minilm", access="grey")


def test_wrong_rank_dtype_and_channels(eff) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInputError, match=r"got shape \[3, 64, 64\], expected \['B', 3, 'H', 'W'\]"):
        eff.forward({"image.pixels": torch.zeros(3, 64, 64)})
    with pytest.raises(InvalidInputError, match="dtype float64 is not allowed.*float32.*float()"):
        eff.forward({"image.pixels": torch.zeros(1, 3, 64, 64, dtype=torch.float64)})
    with pytest.raises(InvalidInputError, match=r"got shape \[1, 4, 64, 64\]"):
        eff.forward({"image.pixels": torch.zeros(1, 4, 64, 64)})
    with pytest.raises(InvalidInputError, match="expected a torch.Tensor, got ndarray"):
        import numpy as np

        eff.forward({"image.pixels": np.zeros((1, 3, 64, 64), dtype=np.float32)})


def test_nan_and_inf_are_refused_before_compute(eff, text) -> None:  # type: ignore[no-untyped-def]
    x = torch.zeros(2, 3, 64, 64)
    x[0, 0, 0, 0] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    before = eff.exposure.forward_queries
    with pytest.raises(InvalidInputError, match="2 of 24576 values are NaN or infinite"):
        eff.forward({"image.pixels": x})
    assert eff.exposure.forward_queries == before
    with pytest.raises(InvalidInputError, match="NaN"):
        text.forward({"text": ["a"]}, add={"text.token_embeds": torch.full((1, 1, 384), float("nan"))})


def test_nan_gradient_sent_back_is_refused(text) -> None:  # type: ignore[no-untyped-def]
    shift = torch.zeros(1, 1, 384, requires_grad=True)
    z = text.forward({"text": ["a cat"]}, add={"text.token_embeds": shift})["text.embeds"]
    with pytest.raises(InvalidInputError, match="gradient sent back to text.embeds"):
        (z * float("nan")).sum().backward()


def test_unknown_ports_and_ops(text, eff) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnknownNameError, match="did you mean 'text.token_embeds'"):
        text.forward({"text": ["a"]}, add={"text.token_embed": torch.zeros(1, 1, 384)})
    with pytest.raises(UnknownNameError, match="unknown input 'pixels'.*image.pixels"):
        eff.forward({"pixels": torch.zeros(1, 3, 64, 64)})
    with pytest.raises(InvalidInputError, match="insert is not possible at port image.layer"):
        lg = graytune.open_backbone("efficientnet-lite0", access="light-gray")
        port = lg.spec.port_names(graytune.PortKind.ENTRY)[0]
        lg.forward({"image.pixels": torch.zeros(1, 3, 64, 64)}, insert={port: torch.zeros(1, 1, 16)})
    with pytest.raises(InvalidInputError, match="no text input was sent"):
        bridge = graytune.open_backbone("bridge:efficientnet-lite0+minilm")
        bridge.forward({"image.pixels": torch.zeros(1, 3, 64, 64)}, add={"text.token_embeds": torch.zeros(1, 1, 384)})


def test_edit_shapes_are_checked(text) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInputError, match=r"got shape \[1, 2, 100\].*\[B or 1, K, 384\]"):
        text.forward({"text": ["a"]}, insert={"text.token_embeds": torch.zeros(1, 2, 100)})
    with pytest.raises(InvalidInputError, match=r"got shape \[1, 1, 383\]"):
        text.forward({"text": ["a"]}, add={"text.token_embeds": torch.zeros(1, 1, 383)})
    with pytest.raises(InvalidInputError, match="batch dim 3 does not match the inputs' batch of 2"):
        text.forward({"text": ["a", "b"]}, add={"text.token_embeds": torch.zeros(3, 1, 384)})


def test_token_inputs_are_checked(text) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInputError, match=r"ids must lie in \[0, 30522\)"):
        text.forward({"text.input_ids": torch.tensor([[101, 40000, 102]])})
    with pytest.raises(InvalidInputError, match="list of strings"):
        text.forward({"text": "a cat"})
    with pytest.raises(InvalidInputError, match="at least one real token"):
        text.forward({"text.input_ids": torch.tensor([[101, 102]]), "text.attention_mask": torch.tensor([[0, 0]])})
    with pytest.raises(InvalidInputError, match="disagree on batch size"):
        bridge = graytune.open_backbone("bridge:efficientnet-lite0+minilm")
        bridge.forward({"image.pixels": torch.zeros(3, 3, 64, 64), "text": ["a", "b"]})


def test_black_box_refuses_gradients_with_the_level_needed() -> None:
    bb = graytune.open_backbone("efficientnet-lite0", access="black-box")
    with pytest.raises(AccessDeniedError, match="needs access level dark-gray; this handle was granted black-box"):
        bb.forward({"image.pixels": torch.zeros(1, 3, 64, 64, requires_grad=True)})


def test_remote_ids_need_a_key_and_a_reachable_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from graytune.access import RemoteHandle
    from graytune.errors import RemoteError

    monkeypatch.delenv("GRAYTUNE_API_KEY", raising=False)
    with pytest.raises(InvalidInputError, match="needs an API key"):
        graytune.open_backbone("http://127.0.0.1:9/")
    with pytest.raises(RemoteError, match="could not be reached") as err:
        RemoteHandle("http://127.0.0.1:9/", graytune.AccessLevel.DARK_GRAY, api_key="x" * 32, retries=0)
    assert err.value.status == 0


def test_lone_surrogates_and_zero_rows_are_refused_in_process(text) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInputError, match="text 1 holds '\\\\ud800' at character 2, a lone UTF-16 surrogate"):
        text.encode_text(["fine", "a \ud800 b"])
    with pytest.raises(InvalidInputError, match=r"0 rows \(text.input_ids \[0, 4\]"):
        text.encode_text({"text.input_ids": torch.zeros(0, 4, dtype=torch.long)})


def test_unknown_ports_are_matched_only_against_the_ports_the_level_shows(text) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnknownNameError) as err:
        text.forward({"text": ["a"]}, add={"text.layer.50": torch.zeros(1, 1, 384)})
    assert not any("layer" in name for name in [*err.value.known, *err.value.suggestions])
    light = graytune.open_backbone("minilm", access="light-gray")
    with pytest.raises(UnknownNameError, match="did you mean 'text.layer.5'"):
        light.forward({"text": ["a"]}, add={"text.layer.50": torch.zeros(1, 1, 384)})
    with pytest.raises(AccessDeniedError, match="needs access level light-gray"):  # an exact name: the level needed
        text.forward({"text": ["a"]}, add={"text.layer.5": torch.zeros(1, 1, 384)})
