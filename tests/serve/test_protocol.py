"""The protocol version over HTTP: the server answers it, reads unversioned clients as version 1,
refuses newer requests with what to do, and the client refuses a server that cannot read it."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from safetensors.torch import save

import graytune
from graytune.access.wire import PROTOCOL_VERSION, ProtocolError, encode
from tests.serve.conftest import ALICE

IDS = {"inputs/text.input_ids": torch.tensor([[101, 1037, 4937, 102]]),
       "inputs/text.attention_mask": torch.ones(1, 4, dtype=torch.long)}


@pytest.fixture
def client(serve):  # type: ignore[no-untyped-def]
    url, _ = serve(access="dark-gray", reads=())
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30) as http:
        yield http


def test_the_spec_answers_the_protocol(client) -> None:  # type: ignore[no-untyped-def]
    info = client.get("/v1/spec").json()
    assert info["protocol"] == PROTOCOL_VERSION == 1 and info["protocol_min"] == 1


def test_a_client_from_before_versioning_is_served(client) -> None:  # type: ignore[no-untyped-def]
    old = save(IDS, metadata={"graytune": json.dumps({"outputs": ["text.embeds"]})})  # no "protocol" field
    assert client.post("/v1/forward", content=old).status_code == 200
    assert client.post("/v1/tokenize", json={"texts": ["a cat"]}).status_code == 200


@pytest.mark.parametrize("path", ["/v1/forward", "/v1/vjp", "/v1/tokenize"])
def test_a_newer_request_gets_400_saying_what_to_do(client, path) -> None:  # type: ignore[no-untyped-def]
    newer = PROTOCOL_VERSION + 1
    if path == "/v1/tokenize":
        response = client.post(path, json={"texts": ["a cat"], "protocol": newer})
    else:
        response = client.post(path, content=encode(IDS, {"protocol": newer, "session": "x"}))
    assert response.status_code == 400
    payload = response.json()
    assert payload["error"] == "protocol"
    for words in (f"protocol {newer}", f"speaks protocol {PROTOCOL_VERSION}", "upgrade graytune on the server"):
        assert words in payload["detail"]


def test_the_client_refuses_a_server_speaking_a_newer_protocol(  # type: ignore[no-untyped-def]
        serve, monkeypatch) -> None:
    import graytune.serve.routes.info as app_module

    monkeypatch.setattr(app_module, "server_protocol", lambda: {"protocol": 2, "protocol_min": 2})
    url, _ = serve(access="dark-gray", reads=())
    with pytest.raises(ProtocolError, match="speaks graytune protocol 2.*upgrade graytune on the client"):
        graytune.open_backbone(url, "dark-gray", api_key=ALICE)
    monkeypatch.setattr(app_module, "server_protocol", lambda: {"protocol": 2, "protocol_min": 1})
    assert graytune.open_backbone(url, "dark-gray", api_key=ALICE).protocol == 2  # newer, and still reads ours
