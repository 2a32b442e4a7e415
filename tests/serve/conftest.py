"""A MiniLM served on a free loopback port, in this process, for the serve tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

import graytune
from graytune.access import LocalHandle
from graytune.serve import ApiKeys, ServeConfig, create_app
from graytune.serve.runner import BackgroundServer

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdefgh"
KEYS = {"alice": ALICE, "bob": BOB}


@pytest.fixture(scope="session")
def minilm() -> LocalHandle:
    return graytune.open_backbone("minilm", "light-gray", reads=["text.token_embeds"])


@pytest.fixture
def serve(minilm) -> Iterator[Callable[..., tuple[str, object]]]:  # type: ignore[no-untyped-def]
    """``serve(**config) -> (url, app)``: a fresh service (fresh sessions and quotas) per call."""
    servers = []

    def start(handle=None, extra=None, **config):  # type: ignore[no-untyped-def]
        config.setdefault("access", "light-gray")
        config.setdefault("reads", ("text.token_embeds",))
        app = create_app(handle or minilm, ServeConfig(**config), ApiKeys(KEYS), extra=extra)
        server = BackgroundServer(app)
        servers.append(server)
        return server.start(), app

    yield start
    for server in servers:
        server.stop()
