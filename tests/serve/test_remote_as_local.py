"""Remote behaves as in-process (issue 28 items 8-10): the same error for a port above the level, refusals that
say what to do, and an HTTP API that documents itself (OpenAPI page, JSON on hosted adapters, docs/http-api.md)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

import graytune
from graytune.access.wire import decode, encode
from graytune.errors import AccessDeniedError, RemoteError, UnknownNameError
from graytune.serve.routes import boundary, hosted, info
from graytune.serve.routes.hosted import install_adapters
from tests.serve.conftest import ALICE
from tests.serve.test_hosted_adapters import _saved

DOCS = Path(__file__).resolve().parents[2] / "docs" / "http-api.md"


def _raised(call) -> Exception:  # type: ignore[no-untyped-def]
    try:
        call()
    except Exception as err:  # noqa: BLE001 - the error is what is compared
        return err
    raise AssertionError("no error was raised")


def test_a_port_above_the_level_raises_the_same_error_remote_and_in_process(serve, minilm) -> None:
    url, _ = serve(access="dark-gray", reads=())
    remote = graytune.open_backbone(url, "dark-gray", api_key=ALICE)
    local = minilm.at_level(graytune.AccessLevel.DARK_GRAY)
    for op, name, grad in [("add", "text.layer.2", True), ("add", "text.layer.2", False),
                           ("insert", "text.prompts.1", True)]:
        edit = {op: {name: torch.zeros(1, 1, 384, requires_grad=grad)}}
        here = _raised(lambda: local.forward({"text": ["a cat"]}, **edit))
        there = _raised(lambda: remote.forward({"text": ["a cat"]}, **edit))
        assert isinstance(here, AccessDeniedError) and isinstance(there, AccessDeniedError), (here, there)
        assert str(there).startswith(str(here)) and "light-gray" in str(there)  # the server adds what it allows
        assert there.needed == "light-gray" and there.granted == "dark-gray"
    here = _raised(lambda: local.forward({"text": ["a"]}, insert={"text.layer.50": torch.zeros(1, 1, 384)}))
    there = _raised(lambda: remote.forward({"text": ["a"]}, insert={"text.layer.50": torch.zeros(1, 1, 384)}))
    assert isinstance(there, UnknownNameError) and str(there) == str(here)  # a port that does not exist


def test_a_level_above_the_server_names_its_methods_and_the_owners_flag(serve) -> None:
    url, _ = serve(access="dark-gray", reads=())
    err = _raised(lambda: graytune.open_backbone(url, "light-gray", api_key=ALICE))
    assert isinstance(err, AccessDeniedError) and isinstance(err, RemoteError) and err.status == 403
    words = str(err)
    assert "lends minilm at dark-gray" in words and "graytune serve --access light-gray" in words
    assert "dga" in words and "lga" not in words.replace("lga-", "")  # a dark-gray method, not a light-gray one
    assert "a handle at light-gray needs access level light-gray" not in words  # it used to repeat itself
    white = _raised(lambda: graytune.open_backbone(url, "white-box", api_key=ALICE))
    assert isinstance(white, AccessDeniedError) and "never crosses the network" in str(white)
    assert "dga" in str(white)
    raw = httpx.post(f"{url}/v1/forward", headers={"Authorization": f"Bearer {ALICE}"},
                     content=encode({"inputs/text.input_ids": torch.tensor([[101, 102]]),
                                     "add/text.layer.3": torch.zeros(1, 1, 384)}))
    assert raw.status_code == 403 and "graytune serve --access light-gray" in raw.json()["detail"]


def test_read_refusals_read_as_sentences(serve) -> None:
    local = graytune.open_backbone("minilm", "dark-gray")  # no read grant
    url, _ = serve(handle=local, access="dark-gray", reads=())
    err = _raised(lambda: graytune.open_backbone(url, "dark-gray", reads=["text.token_embeds"], api_key=ALICE))
    assert isinstance(err, AccessDeniedError)
    words = str(err)
    assert "needs access level an explicit grant" not in words and "grants []" not in words, words
    assert "needs an explicit grant" in words and "graytune serve --reads text.token_embeds" in words
    here = _raised(lambda: local.forward({"text": ["a"]}, reads=["text.token_embeds"]))
    assert isinstance(here, AccessDeniedError) and "needs access level an explicit grant" not in str(here)
    assert "read at text.token_embeds needs an explicit grant by the owner" in str(here)


def test_a_refused_key_says_where_the_key_came_from(serve, monkeypatch) -> None:
    url, _ = serve(access="dark-gray", reads=())
    monkeypatch.setenv("GRAYTUNE_API_KEY", "wrong-wrong-wrong-wrong-wrong")
    err = _raised(lambda: graytune.open_backbone(url, "dark-gray"))
    assert isinstance(err, RemoteError) and err.status == 401
    assert "the API key from $GRAYTUNE_API_KEY was refused" in str(err) and "Bearer KEY" not in str(err)
    err = _raised(lambda: graytune.open_backbone(url, "dark-gray", api_key="also-wrong-also-wrong-also"))
    assert "the API key from api_key= was refused" in str(err)
    monkeypatch.delenv("GRAYTUNE_API_KEY")
    missing = _raised(lambda: graytune.open_backbone(url, "dark-gray"))
    assert str(missing).index("$GRAYTUNE_API_KEY") < str(missing).index("api_key=")  # a CLI user reads this first


@pytest.fixture(scope="module")
def adapter_folder(minilm, tmp_path_factory) -> str:  # type: ignore[no-untyped-def]
    return str(_saved(minilm, "output", 3, tmp_path_factory.mktemp("hosted") / "out"))


def test_the_server_describes_its_routes_on_an_openapi_page(serve, adapter_folder) -> None:
    url, app = serve(access="dark-gray", reads=(), adapters=(f"out={adapter_folder}",), extra=install_adapters)
    schema = httpx.get(f"{url}/openapi.json").json()
    for path, method in _routes():
        operation = schema["paths"][path][method]
        assert operation.get("description") or operation.get("summary"), (path, method)
    for path in ("/v1/forward", "/v1/vjp", "/v1/tokenize", "/v1/adapters/{name}/embed"):
        assert "requestBody" in schema["paths"][path]["post"], path
    assert "application/json" in schema["paths"]["/v1/adapters/{name}/classify"]["post"]["requestBody"]["content"]
    page = httpx.get(f"{url}/docs")
    assert page.status_code == 200 and "openapi.json" in page.text


def test_hosted_adapters_take_json_texts(serve, adapter_folder) -> None:
    url, _ = serve(access="dark-gray", reads=(), adapters=(f"out={adapter_folder}",), extra=install_adapters)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60) as client:
        answer = client.post("/v1/adapters/out/embed", json={"texts": ["a cat", "a dog"]})
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/json", answer.text
        wire = decode(client.post("/v1/adapters/out/embed", content=encode({}, {"texts": ["a cat", "a dog"]})).content)
        torch.testing.assert_close(torch.tensor(answer.json()["embeds"]), wire[0]["embeds"])
        scores = client.post("/v1/adapters/out/classify", json={"texts": ["a cat"], "classes": ["cat", "dog"]})
        assert scores.status_code == 200 and scores.json()["classes"] == ["cat", "dog"]
        assert torch.tensor(scores.json()["logits"]).shape == (1, 2)
        bad = client.post("/v1/adapters/out/embed", json=["a cat"])
        assert bad.status_code == 400 and "JSON object" in bad.json()["detail"]


def _routes() -> list[tuple[str, str]]:
    """(path, method) of every route graytune serve adds, hosted adapters included."""
    return [(route.path, method.lower()) for router in (info.router, boundary.router, hosted.router)
            for route in router.routes for method in route.methods - {"HEAD"}]  # type: ignore[attr-defined]


def test_the_http_reference_names_every_route(serve, adapter_folder) -> None:
    _, app = serve(access="dark-gray", reads=(), adapters=(f"out={adapter_folder}",), extra=install_adapters)
    text = DOCS.read_text(encoding="utf-8")
    pages = [(route.path, "get") for route in app.routes if getattr(route, "path", "") in ("/docs", "/openapi.json")]
    assert len(pages) == 2
    for path, method in [*_routes(), *pages]:
        assert f"{method.upper()} {path}" in text, f"{method.upper()} {path} is not in docs/http-api.md"
    for status in ("400", "401", "403", "408", "410", "413", "429", "503", "504"):
        assert f"| {status} |" in text, status
