"""Each bad request gets its 4xx before any compute, with a short body and no stack trace."""

from __future__ import annotations

import json
import struct

import httpx
import pytest
import torch

import graytune
from graytune.access.wire import encode
from tests.serve.conftest import ALICE, BOB

IDS = {"inputs/text.input_ids": torch.tensor([[101, 1037, 4937, 102]]),
       "inputs/text.attention_mask": torch.ones(1, 4, dtype=torch.long)}
SHIFT = torch.zeros(1, 1, 384)


@pytest.fixture
def service(serve):  # type: ignore[no-untyped-def]
    """(client for alice, the app) with a counter of every compute the server starts."""
    url, app = serve(access="dark-gray", reads=(), max_body_mb=1.0, quota_grad_rows=50)
    svc = app.state.service
    calls = {"n": 0}
    original = svc.compute

    async def counted(work, until):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return await original(work, until)

    svc.compute = counted
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)
    yield client, svc, calls
    client.close()


def _forward(client: httpx.Client, tensors=None, **meta):  # type: ignore[no-untyped-def]
    body = encode(IDS if tensors is None else tensors, {"outputs": ["text.embeds"], **meta})
    return client.post("/v1/forward", content=body)


def _expect(response: httpx.Response, status: int, words: str = "") -> None:
    assert response.status_code == status, response.text
    payload = response.json()
    assert set(payload) == {"error", "detail"}
    assert "Traceback" not in payload["detail"] and "File \"" not in payload["detail"]
    assert words.lower() in payload["detail"].lower(), payload["detail"]


def _with_grad() -> dict[str, torch.Tensor]:
    return {**IDS, "add/text.token_embeds": SHIFT}


def test_keys(service) -> None:
    client, _, calls = service
    _expect(httpx.post(f"{str(client.base_url).rstrip('/')}/v1/forward", content=encode(IDS)), 401, "API key")
    _expect(httpx.post(f"{str(client.base_url).rstrip('/')}/v1/forward", content=encode(IDS),
                       headers={"Authorization": "Bearer " + ALICE[:-1] + "x"}), 401)
    _expect(httpx.get(f"{str(client.base_url).rstrip('/')}/v1/spec", headers={"Authorization": ALICE}), 401)  # no scheme
    assert calls["n"] == 0


def test_someone_elses_session_answers_as_an_unknown_one(service) -> None:
    client, svc, _ = service
    ok = _forward(client, _with_grad(), grad=["add/text.token_embeds"])
    assert ok.status_code == 200
    session = json.loads(_metadata(ok.content))["session"]
    assert session and len(session) >= 40
    bob = httpx.Client(base_url=client.base_url, headers={"Authorization": f"Bearer {BOB}"})
    grads = encode({"grad/text.embeds": torch.ones(1, 384)}, {"session": session})
    foreign = bob.post("/v1/vjp", content=grads)
    unknown = bob.post("/v1/vjp", content=encode({"grad/text.embeds": torch.ones(1, 384)}, {"session": "x" * 43}))
    _expect(foreign, 410, "recompute")
    assert (foreign.status_code, foreign.content) == (unknown.status_code, unknown.content)
    for release in (lambda sid: bob.delete(f"/v1/sessions/{sid}"),
                    lambda sid: bob.post("/v1/sessions/release", json={"session": sid})):
        answers = [release(sid) for sid in (session, "x" * 43)]
        assert [(a.status_code, a.json()) for a in answers] == [(200, {"released": False})] * 2
    assert svc.store.stats()["sessions"] == 1  # alice's session survives bob's attempts


@pytest.mark.parametrize("tensors, words", [
    ({**IDS, "add/text.token_embeds": torch.full((1, 1, 384), float("nan"))}, "NaN"),
    ({**IDS, "add/text.token_embeds": torch.full((1, 1, 384), float("inf"))}, "infinite"),
    ({**IDS, "add/text.token_embeds": torch.zeros(1, 1, 384, dtype=torch.float64)}, "dtype F64"),
    ({**IDS, "add/text.token_embeds": torch.zeros(1, 1, 384, dtype=torch.float16)}, "dtype F16"),
    ({"inputs/text.input_ids": torch.tensor([101, 1037, 102])}, "shape"),  # wrong rank
    ({**IDS, "add/text.token_embeds": torch.zeros(1, 1, 383)}, "shape"),
    ({**IDS, "add/text.layer.3": torch.zeros(1, 1, 384)}, "light-gray"),  # above the granted level
    ({**IDS, "weights/x": torch.zeros(1)}, "names start with"),
])
def test_bad_tensors(service, tensors, words) -> None:
    client, _, calls = service
    _expect(_forward(client, tensors), 400 if "light-gray" not in words else 403, words)
    assert calls["n"] == 0


def test_a_level_above_the_granted_one(service) -> None:
    client, _, calls = service
    _expect(client.get("/v1/spec", params={"access": "light-gray"}), 403, "light-gray")
    _expect(_forward(client, access="light-gray"), 403, "dark-gray")
    _expect(client.get("/v1/spec", params={"access": "white-box"}), 403)
    with pytest.raises(graytune.errors.RemoteError) as err:
        graytune.open_backbone(str(client.base_url), "light-gray", api_key=ALICE)
    assert err.value.status == 403
    assert calls["n"] == 0


def test_headers_that_lie_and_bodies_that_are_cut(service) -> None:
    client, _, calls = service
    body = encode(IDS)
    size = struct.unpack("<Q", body[:8])[0]
    header = json.loads(body[8:8 + size])
    header["inputs/text.input_ids"]["shape"] = [1, 5]  # 5 ids in the space of 4
    lying = json.dumps(header).encode()
    _expect(client.post("/v1/forward", content=struct.pack("<Q", len(lying)) + lying + body[8 + size:]), 400,
            "header says shape [1, 5]")
    _expect(client.post("/v1/forward", content=body[:-8]), 400, "truncated")
    _expect(client.post("/v1/forward", content=body + b"\0" * 8), 400, "padded")
    _expect(client.post("/v1/forward", content=struct.pack("<Q", 1 << 40) + body[8:]), 400, "header claims")
    _expect(client.post("/v1/forward", content=b"\x01"), 400, "too short")
    assert calls["n"] == 0


def test_oversize_bodies_get_413(service) -> None:
    client, _, calls = service
    big = encode({"inputs/text.input_ids": torch.zeros(1, 200_000, dtype=torch.long)})  # 1.6 MB > 1 MiB
    _expect(client.post("/v1/forward", content=big), 413, "limited")

    def chunks():  # no Content-Length: the limit is counted while streaming
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    _expect(client.post("/v1/forward", content=chunks()), 413)
    assert calls["n"] == 0


def test_gradients_of_the_wrong_shape_keep_the_session(service) -> None:
    client, svc, calls = service
    session = json.loads(_metadata(_forward(client, _with_grad(), grad=["add/text.token_embeds"]).content))["session"]
    before = calls["n"]
    for grads, words in [({"grad/text.embeds": torch.ones(2, 384)}, "shape [2, 384]"),
                         ({"grad/text.embeds": torch.ones(1, 384, dtype=torch.float64)}, "F64"),
                         ({"grad/image.embeds": torch.ones(1, 384)}, "outputs are"),
                         ({"grad/text.embeds": torch.full((1, 384), float("nan"))}, "NaN")]:
        _expect(client.post("/v1/vjp", content=encode(grads, {"session": session})), 400, words)
    assert svc.store.stats()["sessions"] == 1
    ok = client.post("/v1/vjp", content=encode({"grad/text.embeds": torch.ones(1, 384)}, {"session": session}))
    assert ok.status_code == 200
    assert calls["n"] == before + 1  # only the good gradient reached the backbone
    _expect(client.post("/v1/vjp", content=encode({"grad/text.embeds": torch.ones(1, 384)}, {"session": session})),
            410, "recompute")


def test_quotas_count_samples_and_gradient_rows(serve) -> None:
    url, _ = serve(access="dark-gray", reads=(), quota_samples=3, quota_grad_rows=2)
    remote = graytune.open_backbone(url, "dark-gray", api_key=ALICE)
    shift = torch.zeros(1, 1, 384, requires_grad=True)
    remote.forward({"text": ["a", "b"]}, add={"text.token_embeds": shift})["text.embeds"].sum().backward()
    with pytest.raises(graytune.errors.RemoteError, match="gradient-row quota") as err:
        remote.forward({"text": ["c"]}, add={"text.token_embeds": shift})["text.embeds"].sum().backward()
    assert err.value.status == 429
    with pytest.raises(graytune.errors.RemoteError, match="sample quota"):
        remote.encode_text(["d", "e"])
    other = graytune.open_backbone(url, "dark-gray", api_key=BOB)  # quotas are per client
    assert other.encode_text(["d", "e"]).shape == (2, 384)


def _metadata(body: bytes) -> str:
    size = struct.unpack("<Q", body[:8])[0]
    return json.loads(body[8:8 + size])["__metadata__"]["graytune"]


def test_a_busy_backbone_answers_503_within_the_timeout(serve) -> None:
    url, app = serve(access="dark-gray", reads=(), request_timeout_s=0.3)
    svc = app.state.service
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)
    svc.compute_lock.acquire()  # someone else's long step holds the backbone
    try:
        _expect(_forward(client), 503, "busy")
    finally:
        svc.compute_lock.release()
    assert _forward(client).status_code == 200


def test_white_box_is_never_served(minilm) -> None:
    from graytune.serve import ApiKeys, ServeConfig, create_app

    whitebox = graytune.open_backbone("minilm", "white-box")
    for handle, level in ((minilm, "white-box"), (whitebox, "dark-gray")):
        with pytest.raises(graytune.InvalidInputError, match="never crosses the network"):
            create_app(handle, ServeConfig(access=level), ApiKeys({"a": ALICE}))
    with pytest.raises(graytune.InvalidInputError, match="shorter than 16"):
        ApiKeys({"a": "short"})
