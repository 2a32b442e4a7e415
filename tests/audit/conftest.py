"""A tiny random CLIP to attack, and synthetic probe tasks whose labels the backbone's own features define.

Labels are ``argmax`` of a fixed random projection of the backbone's centred embeddings, so the
backbone's linear probe is near perfect while a surrogate's probe is only as good as its fidelity.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import pytest
import torch

import graytune
from graytune.audit import AuditData
from graytune.serve import ApiKeys, ServeConfig, create_app
from graytune.serve.runner import BackgroundServer

KEY = "audit-key-0123456789abcdef"
CLASSES = 5


def _labels(embed: Callable[[object], torch.Tensor], train: object, test: object) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        z_train, z_test = embed(train), embed(test)
    mean = z_train.mean(0)
    projection = torch.randn(z_train.shape[1], CLASSES, generator=torch.Generator().manual_seed(1))
    return ((z_train - mean) @ projection).argmax(1), ((z_test - mean) @ projection).argmax(1)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny backbone's ops are too small for a second thread, which on shared cores only waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_dir) -> str:  # type: ignore[no-untyped-def]
    return f"hf-clip:{tiny_clip_dir}"


@pytest.fixture(scope="session")
def image_data(tiny_clip) -> AuditData:  # type: ignore[no-untyped-def]
    """Smooth random 32 x 32 images (the tiny CLIP's size)."""
    g = torch.Generator().manual_seed(0)

    def images(n: int) -> torch.Tensor:
        return torch.nn.functional.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=32, mode="bilinear")

    pool, train, test = images(3000), images(200), images(200)
    handle = graytune.open_backbone(tiny_clip, "black-box")
    y_train, y_test = _labels(handle.encode_image, train, test)
    return AuditData("image", "synthetic-images", pool, train, y_train, test, y_test,
                     tuple(f"c{i}" for i in range(CLASSES)))


@pytest.fixture(scope="session")
def text_data(tiny_clip) -> AuditData:  # type: ignore[no-untyped-def]
    """Random short phrases over 200 made-up words (the tiny CLIP's tokenizer reads characters)."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 5))) for _ in range(200)]

    def phrases(n: int) -> list[str]:
        return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 4))) for _ in range(n)]

    pool, train, test = phrases(3000), phrases(200), phrases(200)
    handle = graytune.open_backbone(tiny_clip, "black-box")
    y_train, y_test = _labels(handle.encode_text, train, test)
    return AuditData("text", "synthetic-phrases", pool, train, y_train, test, y_test,
                     tuple(f"c{i}" for i in range(CLASSES)))


@pytest.fixture
def serve_tiny(tiny_clip) -> Iterator[Callable[..., str]]:  # type: ignore[no-untyped-def]
    """``serve_tiny(**config) -> url``: the tiny CLIP behind graytune serve, in this process."""
    servers = []

    def start(**config: object) -> str:
        config.setdefault("access", "dark-gray")
        handle = graytune.open_backbone(tiny_clip, str(config["access"]), reads=config.get("reads", ()))
        app = create_app(handle, ServeConfig(**config), ApiKeys({"auditor": KEY}))  # type: ignore[arg-type]
        server = BackgroundServer(app)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
