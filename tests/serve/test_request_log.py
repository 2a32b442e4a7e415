"""The owner sees refused and failed requests at default verbosity: who asked (the key's name, never the key;
the address without a valid key), the route, the status and why."""

from __future__ import annotations

import logging

import httpx
import pytest

import graytune
from tests.serve.conftest import ALICE, BOB

LOGGER = "graytune.serve.requests"


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_a_401_names_the_address_and_never_the_key(serve, caplog) -> None:
    url, _ = serve(access="dark-gray", reads=())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        answer = httpx.get(f"{url}/v1/stats", headers={"Authorization": "Bearer not-a-key-of-this-server"})
    assert answer.status_code == 401
    [line] = _lines(caplog)
    assert line.startswith("address 127.0.0.1 GET /v1/stats -> 401 unauthorized: this server knows no such API key")
    assert "not-a-key-of-this-server" not in caplog.text
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == LOGGER)


def test_a_429_names_the_client_by_its_key_name(serve, caplog) -> None:
    url, _ = serve(access="dark-gray", reads=(), quota_samples=1)
    remote = graytune.open_backbone(url, "dark-gray", api_key=ALICE)
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(graytune.errors.RemoteError) as err:
        remote.encode_text(["a", "b"])
    assert err.value.status == 429
    [line] = _lines(caplog)
    assert line.startswith("alice POST /v1/forward -> 429 quota:") and "sample quota" in line
    assert ALICE not in caplog.text


def test_403_413_and_404_are_logged_too_and_successes_are_not(serve, caplog) -> None:
    url, _ = serve(access="dark-gray", reads=(), max_texts=2)
    remote = graytune.open_backbone(url, "dark-gray", api_key=BOB)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        remote.encode_text(["fine"])
        with pytest.raises(graytune.errors.GraytuneError):
            remote.encode_text(["one", "two", "three"])
        bearer = {"Authorization": f"Bearer {BOB}"}
        denied = httpx.get(f"{url}/v1/spec", params={"access": "light-gray"}, headers=bearer)
        missing = httpx.get(f"{url}/v1/no-such-route", headers=bearer)
    assert (denied.status_code, missing.status_code) == (403, 404)
    lines = _lines(caplog)
    assert len(lines) == 3, lines
    assert lines[0].startswith("bob POST /v1/tokenize -> 413 too_large: 3 strings in one request")
    assert lines[1].startswith("bob GET /v1/spec -> 403 access_denied: light-gray access was asked for")
    assert lines[2] == "bob GET /v1/no-such-route -> 404 Not Found"


def test_a_session_id_in_a_url_is_not_logged(serve, caplog) -> None:
    url, _ = serve(access="dark-gray", reads=())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        answer = httpx.delete(f"{url}/v1/sessions/secret-session-id", headers={"Authorization": "Bearer wrong"})
    assert answer.status_code == 401
    assert "secret-session-id" not in caplog.text and "/v1/sessions/<redacted> -> 401" in caplog.text


def test_a_500_is_logged_at_error_naming_the_client(serve, caplog, monkeypatch) -> None:
    url, app = serve(access="dark-gray", reads=())

    def broken(client: str) -> None:
        raise RuntimeError("a bug of the owner's")

    monkeypatch.setattr(app.state.service, "stats", broken)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        answer = httpx.get(f"{url}/v1/stats", headers={"Authorization": f"Bearer {ALICE}"})
    assert answer.status_code == 500 and "Traceback" not in answer.text
    [record] = [r for r in caplog.records if r.name == LOGGER]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "alice GET /v1/stats -> 500 internal: RuntimeError"
