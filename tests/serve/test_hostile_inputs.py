"""Hostile input, one test per finding of the loopback attack (issue 10): malformed requests get 400,
oversized work gets 413 before any work, and clients learn nothing about each other."""

from __future__ import annotations

import logging
import struct

import httpx
import pytest
import torch

import graytune
from graytune.access import LocalHandle
from graytune.access.wire import encode
from tests.serve.conftest import ALICE, BOB

IDS = {"inputs/text.input_ids": torch.tensor([[101, 1037, 4937, 102]]),
       "inputs/text.attention_mask": torch.ones(1, 4, dtype=torch.long)}
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture
def service(serve, monkeypatch):  # type: ignore[no-untyped-def]
    """(alice's client, bob's client, the service, a count of backbone computations and tokenizations)."""
    url, app = serve(access="dark-gray", reads=())
    svc = app.state.service
    work = {"compute": 0, "tokenize": 0}
    compute, tokenize = svc.compute, LocalHandle.tokenize

    async def counted(job, until):  # type: ignore[no-untyped-def]
        work["compute"] += 1
        return await compute(job, until)

    def tokenized(self, texts):  # type: ignore[no-untyped-def]
        work["tokenize"] += 1
        return tokenize(self, texts)

    svc.compute = counted
    monkeypatch.setattr(LocalHandle, "tokenize", tokenized)
    clients = [httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
               for key in (ALICE, BOB)]
    yield clients[0], clients[1], svc, work
    for client in clients:
        client.close()


def _expect(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    payload = response.json()
    assert set(payload) == {"error", "detail"}
    assert "Traceback" not in payload["detail"]
    for word in words:
        assert word.lower() in payload["detail"].lower(), payload["detail"]
    return payload


# ---- no 5xx for malformed input -------------------------------------------------------------------------

def test_deeply_nested_json_in_the_safetensors_header(service) -> None:
    alice, _, _, work = service
    _expect(alice.post("/v1/forward", content=struct.pack("<Q", len(DEEP)) + DEEP), 400, "nests JSON too deeply")
    assert work["compute"] == 0


def test_deeply_nested_json_to_tokenize(service) -> None:
    alice, _, _, work = service
    _expect(alice.post("/v1/tokenize", content=b'{"texts": ' + DEEP + b"}"), 400, "nests JSON too deeply")
    assert work == {"compute": 0, "tokenize": 0}


def test_an_integer_tensor_named_in_grad(service) -> None:
    alice, _, _, work = service
    body = encode(IDS, {"grad": ["inputs/text.input_ids"]})
    _expect(alice.post("/v1/forward", content=body), 400, "inputs/text.input_ids", "float32")
    assert work["compute"] == 0


@pytest.mark.parametrize("route", ["forward", "tokenize"])
def test_lone_surrogates_in_texts(service, route) -> None:
    alice, _, _, work = service
    if route == "forward":
        response = alice.post("/v1/forward", content=encode({}, {"texts": ["fine", "a \ud800 b"]}))
    else:
        response = alice.post("/v1/tokenize", content=b'{"texts": ["fine", "a \\ud800 b"]}')
    _expect(response, 400, "text 1", "surrogate", "UTF-8")
    assert work == {"compute": 0, "tokenize": 0}


@pytest.mark.parametrize("tensors", [
    {"inputs/text.input_ids": torch.zeros(0, 4, dtype=torch.long)},
    {"inputs/text.input_ids": torch.zeros(0, 4, dtype=torch.long), "add/text.token_embeds": torch.zeros(1, 1, 384)},
])
def test_a_zero_row_batch(service, tensors) -> None:
    alice, _, _, work = service
    _expect(alice.post("/v1/forward", content=encode(tensors, {"grad": [n for n in tensors if "add" in n]})),
            400, "0 rows")
    assert work["compute"] == 0


def test_a_json_body_where_a_message_belongs(service) -> None:
    alice, _, _, _ = service
    _expect(alice.post("/v1/forward", json={"texts": ["a cat"]}), 400, "safetensors")


# ---- work bounded before it starts ----------------------------------------------------------------------

@pytest.mark.parametrize("tensors, words", [
    ({"inputs/text.input_ids": torch.full((10_000, 16), 1037), "add/text.token_embeds": torch.zeros(1, 1, 384)},
     ["160,000 token positions with gradients", "--max-grad-tokens"]),
    ({"inputs/text.input_ids": torch.full((10_000, 16), 1037)}, ["160,000 token positions (", "--max-tokens"]),
    ({"inputs/text.input_ids": torch.full((64, 128), 1037), "add/text.token_embeds": torch.zeros(1, 1, 384),
      "insert/text.token_embeds": torch.zeros(1, 4, 384)}, ["8,448 token positions", "64 rows x 132"]),
])
def test_rows_times_tokens_are_bounded(service, tensors, words) -> None:
    alice, _, _, work = service
    grad = [n for n in tensors if not n.startswith("inputs/")]
    response = _expect(alice.post("/v1/forward", content=encode(tensors, {"grad": grad})), 413, *words)
    assert response["error"] == "too_large"
    assert work["compute"] == 0


@pytest.mark.parametrize("texts, words", [
    (["x" * 5000], ["string 0 has 5,000 characters", "--max-text-chars"]),
    (["word " * 800] * 80, ["320,000 characters in all", "--max-request-chars"]),
    (["a"] * 5000, ["5,000 strings", "--max-texts"]),
])
def test_texts_are_bounded_before_tokenizing(service, texts, words) -> None:
    alice, _, _, work = service
    _expect(alice.post("/v1/tokenize", json={"texts": texts}), 413, *words)
    _expect(alice.post("/v1/forward", content=encode({}, {"texts": texts})), 413, *words)
    assert work == {"compute": 0, "tokenize": 0}


def test_one_long_string_to_tokenize(service) -> None:  # 60 MB made the process abort; 2 MB shows the limit
    alice, _, _, work = service
    _expect(alice.post("/v1/tokenize", json={"texts": ["cat " * 500_000]}), 413, "2,000,000 characters",
            "--max-text-chars")
    assert work["tokenize"] == 0 and alice.get("/v1/health").status_code == 200


# ---- isolation between clients --------------------------------------------------------------------------

def test_stats_show_only_the_callers_own_figures(serve) -> None:
    url, _ = serve(access="dark-gray", reads=(), admins=("bob",))
    alice = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60)
    bob = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {BOB}"}, timeout=60)
    handle = graytune.open_backbone(url, "dark-gray", api_key=ALICE)
    shift = torch.zeros(1, 1, 384, requires_grad=True)
    handle.forward({"text": ["kept", "for", "later"]}, add={"text.token_embeds": shift})  # a session of alice's
    mine = alice.get("/v1/stats").json()
    assert mine["sessions"] == 1 and mine["samples_used"] == 3 and "clients" not in mine and "quota" not in mine
    theirs = graytune.open_backbone(str(alice.base_url), "dark-gray", api_key=ALICE)
    assert theirs.stats()["sessions"] == 1  # the same client, another handle
    everyone = bob.get("/v1/stats").json()  # bob is an admin
    assert everyone["clients"]["alice"]["sessions"] == 1 and everyone["quota"]["alice"]["samples"] == 3


def test_an_unknown_port_at_dark_gray_suggests_no_hidden_port(service) -> None:
    alice, _, _, _ = service
    body = encode({**IDS, "add/text.layer.50": torch.zeros(1, 1, 384)}, {"grad": ["add/text.layer.50"]})
    payload = _expect(alice.post("/v1/forward", content=body), 400, "unknown port")
    assert "layer" not in payload["detail"].replace("text.layer.50", ""), payload["detail"]


def test_session_ids_stay_out_of_urls_and_logs(service, caplog) -> None:
    alice, _, svc, _ = service
    remote = graytune.open_backbone(str(alice.base_url), "dark-gray", api_key=ALICE)
    sent: list[str] = []
    remote._http.event_hooks["request"].append(lambda request: sent.append(str(request.url)))
    shift = torch.zeros(1, 1, 384, requires_grad=True)
    z = remote.forward({"text": ["a cat"]}, add={"text.token_embeds": shift})["text.embeds"]
    (session,) = [sid for sid in svc.store._entries]
    with caplog.at_level(logging.DEBUG):
        z.sum().backward()
        assert remote.release(session) is False  # already used: the new route, the id in the body
    assert not any(session in url for url in sent) and session not in caplog.text
    old_client = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                                   ("127.0.0.1:5", "DELETE", f"/v1/sessions/{session}", "1.1", 200), None)
    assert all(f.filter(old_client) for f in logging.getLogger("uvicorn.access").filters)
    assert session not in old_client.getMessage() and "/v1/sessions/<redacted>" in old_client.getMessage()


def test_forward_retried_under_one_key_keeps_one_session(service) -> None:
    alice, _, svc, _ = service
    body = encode({**IDS, "add/text.token_embeds": torch.zeros(1, 1, 384)},
                  {"grad": ["add/text.token_embeds"], "request": "attempt-key-1"})
    for _ in range(3):  # the client's retries of one forward
        assert alice.post("/v1/forward", content=body).status_code == 200
    assert svc.store.stats("alice")["sessions"] == 1


@pytest.fixture
def hosted(serve, minilm, tmp_path):  # type: ignore[no-untyped-def]
    """alice's client to a server hosting one DGA adapter as ``dga``, and a count of backbone calls."""
    from graytune.artifacts import save_adapter
    from graytune.model import AdaptedModel
    from graytune.serve.routes.hosted import install_adapters

    save_adapter(AdaptedModel.build(minilm, "dga"), tmp_path / "dga")
    url, app = serve(access="dark-gray", reads=(), adapters=(f"dga={tmp_path / 'dga'}",), extra=install_adapters)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60) as client:
        yield client, app.state.adapters


@pytest.mark.parametrize("classes, template, words", [
    (["cat"] * 1000, "a photo of " + "x" * 30_000 + " {}", ["prompt of 30,", "--max-text-chars"]),
    ([f"class number {i}" for i in range(3000)], "a photo of a {}.", ["token positions", "--max-tokens"]),
])
def test_hosted_classify_prompts_are_bounded_before_they_run(hosted, classes, template, words) -> None:
    client, host = hosted
    body = encode({}, {"texts": ["a kitten"], "classes": classes, "template": template})
    _expect(client.post("/v1/adapters/dga/classify", content=body), 413, *words)
    assert host.backbone_calls == 0
    small = encode({}, {"texts": ["a kitten"], "classes": ["cat", "car"]})
    ok = client.post("/v1/adapters/dga/classify", content=small)
    assert ok.status_code == 200 and host.backbone_calls == 2
