"""Training through a served diffusion model equals training in process (``arch:sd-tiny``, tiny random weights:
mechanics only): each rung's adapters, trained for a few steps on the same concept images, end with the same
tensors to float tolerance, and the client's exposure record says what crossed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import graytune
from graytune.data.catalog import load_splits
from graytune.model import AdaptedModel
from graytune.recipes.run import make_task
from graytune.serve import ApiKeys, ServeConfig, create_app
from graytune.serve.runner import BackgroundServer
from graytune.train.config import TrainConfig
from graytune.train.loop import fit, seed_everything
from tests.serve.conftest import ALICE, KEYS

RUNGS = [("dga", "dark-gray", None), ("lga", "light-gray", None), ("adalink", "dark-gray", None),
         ("prompt-zo", "black-box", "mezo")]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("concept")
    for i in range(10):
        pixels = (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(i)) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, Any]]:
    local = graytune.open_backbone("arch:sd-tiny", access="light-gray", reads=["text.token_embeds"])
    app = create_app(local, ServeConfig(access="light-gray", reads=("text.token_embeds",)), ApiKeys(KEYS))
    server = BackgroundServer(app)
    yield server.start(), local
    server.stop()


def _train(handle: Any, method: str, zo: str | None, images: Path) -> tuple[AdaptedModel, float]:
    splits = load_splits(str(images))
    seed_everything(0)
    model = AdaptedModel.build(handle, method)
    task = make_task(splits, handle, 16)
    fit(model, task, splits.val, TrainConfig(lr=1e-2, max_steps=3, batch_size=2, eval_every=3, seed=0, zo=zo),
        progress=False)
    return model, task.evaluate(model, splits.test)["denoise_mse"]


@pytest.mark.parametrize(("method", "level", "zo"), RUNGS, ids=[r[0] for r in RUNGS])
def test_remote_training_equals_in_process(method: str, level: str, zo: str | None, images: Path,
                                           served: tuple[str, Any]) -> None:
    url, _ = served
    reads = ["text.token_embeds"] if method == "adalink" else []
    local = graytune.open_backbone("arch:sd-tiny", access=level, reads=reads)
    remote = graytune.open_backbone(url, level, api_key=ALICE, reads=reads)
    (ours, ours_mse), (theirs, theirs_mse) = _train(local, method, zo, images), _train(remote, method, zo, images)
    mine, served_state = ours.adapter_state(), theirs.adapter_state()
    assert set(mine) == set(served_state) and mine
    # a zeroth-order estimate divides a difference of two losses by 2 eps, so float noise of 1e-7 becomes 1e-5
    atol = 2e-5 if zo else 1e-6
    for name, tensor in mine.items():
        torch.testing.assert_close(served_state[name], tensor, rtol=1e-5, atol=atol, msg=name)
    assert abs(ours_mse - theirs_mse) < 1e-4
    record = remote.exposure.to_dict()
    assert record["forward_queries"] > 0
    assert (record["gradient_queries"] == 0) == (zo is not None)  # the black-box rung asks no gradient


def test_a_forward_with_too_many_latent_positions_is_refused_before_work(served: tuple[str, Any]) -> None:
    from graytune.errors import RemoteError

    local = graytune.open_backbone("arch:sd-tiny", access="dark-gray")
    app = create_app(local, ServeConfig(access="dark-gray", max_denoising_work=3 * 8 * 8), ApiKeys(KEYS))
    server = BackgroundServer(app)
    remote = graytune.open_backbone(server.start(), "dark-gray", api_key=ALICE)
    try:
        texts = ["a", "b", "c", "d"]
        with pytest.raises(RemoteError, match=r"256 latent positions \(4 latents of 8 x 8, one UNet step each\).*"
                                              r"--max-denoising-work") as err:
            remote.forward({"text": texts, "latents.noisy": torch.zeros(4, 4, 8, 8),
                            "timestep": torch.tensor([1, 2, 3, 4])})
        assert err.value.status == 413 and remote.stats()["samples_used"] == 0
        three = remote.forward({"text": texts[:3], "latents.noisy": torch.zeros(3, 4, 8, 8),
                                "timestep": torch.tensor([1, 2, 3])})["unet.prediction"]
        assert three.shape == (3, 4, 8, 8)  # within the bound, and the server serves on
    finally:
        server.stop()
