"""Hosted adapters: requests naming different adapters share one backbone call and get their own answers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch

from graytune.access.wire import decode, encode
from graytune.artifacts import save_adapter
from graytune.model import AdaptedModel
from graytune.serve import ApiKeys, ServeConfig, create_app
from graytune.serve.adapters import AdapterHost, HostClosed, _Job
from graytune.serve.routes.hosted import install_adapters
from graytune.serve.runner import BackgroundServer
from tests.serve.conftest import ALICE, KEYS


def _saved(handle, method: str, seed: int, folder: Path) -> Path:  # type: ignore[no-untyped-def]
    model = AdaptedModel.build(handle, method)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_adapter(model, folder)
    return folder


@pytest.fixture(scope="module")
def folders(minilm, tmp_path_factory) -> dict[str, str]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("hosted")
    return {"dga-a": str(_saved(minilm, "dga", 1, root / "a")), "dga-b": str(_saved(minilm, "dga", 2, root / "b")),
            "out": str(_saved(minilm, "output", 3, root / "c"))}


@pytest.fixture
def hosts() -> Iterator[Callable[..., AdapterHost]]:
    """``hosts(handle, folders, ...)``: an ``AdapterHost`` closed when the test ends."""
    made: list[AdapterHost] = []

    def make(*args, **kwargs) -> AdapterHost:  # type: ignore[no-untyped-def]
        made.append(AdapterHost(*args, **kwargs))
        return made[-1]

    yield make
    for host in made:
        host.close()


REQUESTS = [("dga-a", ["a red bicycle", "rain"]), ("dga-b", ["the quick brown fox jumps over it"]),
            ("out", ["a lamp"]), ("dga-a", ["two cups of tea on a table"]), ("dga-b", ["snow", "fog", "sun"])]


def test_mixed_adapters_batch_through_one_call_and_match_one_by_one(minilm, folders, hosts) -> None:
    host = hosts(minilm, folders, window_ms=1)
    jobs = [_Job(host.model(name), "text", texts=texts) for name, texts in REQUESTS]
    with torch.no_grad():
        host.run(jobs)
    assert host.backbone_calls == 2  # both DGA adapters in one call; the output-only adapter has no inserts
    for (name, texts), job in zip(REQUESTS, jobs):
        with torch.no_grad():
            alone = host.model(name).encode_text(texts)
        torch.testing.assert_close(job.future.result(), alone, rtol=1e-4, atol=1e-5)
    a, b = jobs[0].future.result(), hosts(minilm, {"x": folders["dga-b"]}).model("x").encode_text(
        REQUESTS[0][1])
    assert (a - b).abs().max() > 1e-3  # each request got its own adapter, not its neighbour's


def test_a_broken_request_does_not_fail_its_batch(minilm, folders, hosts) -> None:
    host = hosts(minilm, folders, window_ms=1)
    good = _Job(host.model("dga-a"), "text", texts=["a cat"])
    bad = _Job(host.model("dga-b"), "text", texts=["a dog"])
    bad.model = None  # type: ignore[assignment]  # fails while preparing
    with torch.no_grad():
        host.run([good, bad])
    assert good.future.result().shape == (1, 384)
    with pytest.raises(AttributeError):
        bad.future.result()


def test_embed_and_classify_over_http_batch_concurrent_clients(serve, folders) -> None:
    url, app = serve(access="dark-gray", reads=(), adapters=tuple(f"{k}={v}" for k, v in folders.items()),
                     batch_window_ms=50, extra=install_adapters)
    host = app.state.adapters
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60)
    assert set(client.get("/v1/adapters").json()) == set(folders)
    answers: dict[int, torch.Tensor] = {}

    def ask(i: int, name: str, texts: list[str]) -> None:
        reply = httpx.post(f"{url}/v1/adapters/{name}/embed", content=encode({}, {"texts": texts}),
                           headers={"Authorization": f"Bearer {ALICE}"}, timeout=60)
        answers[i] = decode(reply.content)[0]["embeds"]

    threads = [threading.Thread(target=ask, args=(i, n, t)) for i, (n, t) in enumerate(REQUESTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert host.backbone_calls < len(REQUESTS)
    for i, (name, texts) in enumerate(REQUESTS):
        with torch.no_grad():
            torch.testing.assert_close(answers[i], host.model(name).encode_text(texts), rtol=1e-4, atol=1e-5)
    reply = client.post("/v1/adapters/dga-a/classify",
                        content=encode({}, {"texts": ["a kitten"], "classes": ["cat", "car"], "template": "a {}"}))
    logits = decode(reply.content)[0]["logits"]
    assert logits.shape == (1, 2)
    reply = client.post("/v1/adapters/dga-c/embed", content=encode({}, {"texts": ["x"]}))
    assert reply.status_code == 400 and "dga-a" in reply.json()["detail"]  # unknown name, with suggestions


def test_image_requests_for_two_adapters_share_a_call(tmp_path, hosts) -> None:  # type: ignore[no-untyped-def]
    import graytune

    bridge = graytune.open_backbone("bridge:efficientnet-lite0+minilm", "dark-gray")
    folders = {"p": str(_saved(bridge, "dga", 4, tmp_path / "p")), "q": str(_saved(bridge, "dga", 5, tmp_path / "q"))}
    host = hosts(bridge, folders, window_ms=1)
    g = torch.Generator().manual_seed(0)
    pixels = [torch.randn(n, 3, 64, 64, generator=g) for n in (2, 1, 3)]
    jobs = [_Job(host.model(name), "image", inputs={"image.pixels": px}) for name, px in zip("pqp", pixels)]
    with torch.no_grad():
        host.run(jobs)
        assert host.backbone_calls == 1
        for name, px, job in zip("pqp", pixels, jobs):
            torch.testing.assert_close(job.future.result(), host.model(name).encode_image(px), rtol=1e-4, atol=1e-4)


def test_close_stops_the_thread_and_fails_what_has_not_run(minilm, folders) -> None:  # type: ignore[no-untyped-def]
    lock = threading.Lock()
    host = AdapterHost(minilm, {"a": folders["dga-a"]}, window_ms=1, lock=lock)
    with lock:  # another client's step holds the backbone
        running = host.submit("a", "text", texts=["a cat"])
        time.sleep(0.3)  # the batcher has taken it and waits for the backbone
        waiting = [host.submit("a", "text", texts=["a dog"]) for _ in range(2)]
        host.close(timeout_s=0.2)  # cannot join yet: the batch it runs waits for the lock
    assert running.result(timeout=30).shape == (1, 384)  # the batch it was running finishes
    for future in [*waiting, host.submit("a", "text", texts=["late"])]:
        with pytest.raises(HostClosed, match="closed"):
            future.result(timeout=5)
    host.thread.join(timeout=10)
    assert not host.thread.is_alive()
    host.close()  # closing twice is harmless


def test_the_server_closes_its_adapter_host_on_shutdown(minilm, folders) -> None:  # type: ignore[no-untyped-def]
    config = ServeConfig(access="dark-gray", reads=(), adapters=(f"a={folders['dga-a']}",))
    app = create_app(minilm, config, ApiKeys(KEYS), extra=install_adapters)
    server = BackgroundServer(app)
    server.start()
    host = app.state.adapters
    assert host.thread.is_alive()
    server.stop()
    assert not host.thread.is_alive()
