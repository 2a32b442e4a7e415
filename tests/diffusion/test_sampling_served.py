"""Image sampling over the network (POST /v1/generate-images) equals sampling in process; bad or too-large requests
are refused before any work, and the server serves on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

import graytune
from graytune.access.wire import call_parts, encode
from graytune.backbones.diffusion_tiny import WIDTH
from graytune.errors import InvalidInputError, RemoteError
from graytune.serve import ApiKeys, ServeConfig, create_app
from graytune.serve.runner import BackgroundServer
from tests.serve.conftest import ALICE, KEYS

PROMPTS = ["a red circle", "a cat on a mat"]
SMALL = {"num_inference_steps": 3, "seed": 11, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def local() -> Any:
    return graytune.open_backbone("arch:sd-tiny", access="dark-gray")


@pytest.fixture(scope="module")
def served(local: Any) -> Iterator[tuple[str, Any]]:
    """arch:sd-tiny served at dark-gray on a free loopback port, with a small denoising-work limit."""
    app = create_app(local, ServeConfig(access="dark-gray", max_denoising_work=100_000), ApiKeys(KEYS))
    server = BackgroundServer(app)
    yield server.start(), app
    server.stop()


def test_a_served_sampling_equals_the_in_process_one(local: Any, served: tuple[str, Any]) -> None:
    url, _ = served
    g = torch.Generator().manual_seed(0)
    edits = {"add": {"text.token_embeds": 0.5 * torch.randn(1, 1, WIDTH, generator=g)},
             "insert": {"text.token_embeds": torch.randn(1, 2, WIDTH, generator=g)}}
    for level in ("dark-gray", "black-box"):
        remote = graytune.open_backbone(url, level, api_key=ALICE)
        want = local.generate_images({"text": PROMPTS}, settings=SMALL, **edits)
        got = remote.generate_images({"text": PROMPTS}, settings=SMALL, **edits)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        record = remote.exposure.to_dict()
        assert (record["generated_images"], record["denoising_steps"], record["forward_samples"]) == (2, 6, 2)
        assert record["gradient_queries"] == 0
    assert record["black_box_edits"]["calls"] == 1  # the black-box client's edits are on its record
    assert remote.stats()["samples_used"] == 4  # one sample per row, both levels


def test_bad_requests_are_refused_before_any_work_and_the_server_serves_on(local: Any,
                                                                           served: tuple[str, Any]) -> None:
    url, _ = served
    remote = graytune.open_backbone(url, "dark-gray", api_key=ALICE)
    before = remote.stats()["samples_used"]
    plan = local.check({"text": ["a cat"]}, outputs=[])
    tensors, meta = call_parts(plan, "dark-gray")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60) as client:
        for settings, words in (({"num_inference_steps": 1001}, "num_inference_steps must be a whole number"),
                                ({"height": 33}, "multiple of 2"),
                                ({"guidance_scale": "high"}, "guidance_scale must be a finite number"),
                                ({"eta": 1.0}, "unknown image settings ['eta']")):
            answer = client.post("/v1/generate-images", content=encode(tensors, {**meta, "settings": settings}))
            assert answer.status_code == 400 and words in answer.json()["detail"], answer.json()
        heavy = encode(tensors, {**meta, "settings": {"num_inference_steps": 200, "height": 64, "width": 64}})
        answer = client.post("/v1/generate-images", content=heavy)  # 200 steps x 32 x 32 latents x 2 > 100,000
        assert answer.status_code == 413 and "--max-denoising-work" in answer.json()["detail"]
    with pytest.raises(InvalidInputError, match="at most 64 are sampled at once"):  # checked before sending
        remote.generate_images({"text": ["a cat"] * 65}, settings=SMALL)
    with pytest.raises(RemoteError, match="--max-denoising-work"):  # the server's own limit, answered 413
        remote.generate_images({"text": ["a cat"] * 4}, settings={**SMALL, "num_inference_steps": 100})
    assert remote.stats()["samples_used"] == before  # nothing refused was charged
    images = remote.generate_images({"text": ["a cat"]}, settings=SMALL)  # and the server serves on
    assert images.shape == (1, 3, 32, 32)


def test_images_past_the_pixel_limit_are_answered_413(local: Any) -> None:
    server = BackgroundServer(create_app(local, ServeConfig(access="dark-gray", max_pixels=1000), ApiKeys(KEYS)))
    try:
        remote = graytune.open_backbone(server.start(), "dark-gray", api_key=ALICE)
        with pytest.raises(RemoteError, match="1,024 pixels .1 images of 32 x 32.*--max-pixels"):
            remote.generate_images({"text": ["a cat"]}, settings=SMALL)
    finally:
        server.stop()
