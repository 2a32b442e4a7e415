"""Two gloo DDP processes train one adapter against a live server: both ranks end identical."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import graytune
from graytune.artifacts import load_adapter
from graytune.serve import ApiKeys, ServeConfig, create_app
from graytune.serve.runner import BackgroundServer

pytestmark = pytest.mark.scale
KEY = "ddp-key-0123456789abcdefgh"


def test_two_rank_gloo_ddp_against_a_live_server(tmp_path: Path) -> None:
    handle = graytune.open_backbone("minilm", "dark-gray")
    app = create_app(handle, ServeConfig(access="dark-gray"), ApiKeys({"trainer": KEY}))  # type: ignore[arg-type]
    with BackgroundServer(app) as url:
        torchrun = Path(sys.executable).parent / "torchrun"
        cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "graytune.recipes.ddp",
               "--backbone", url, "--method", "dga", "--data", "wordnet-supersense", "--max-steps", "4",
               "--batch-size", "8", "--out", str(tmp_path)]
        done = subprocess.run(cmd, env={**os.environ, "GRAYTUNE_API_KEY": KEY}, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        served = app.state.service.ledger.used("trainer")
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert ranks[0] and set(ranks[0]) == set(ranks[1])
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert any(t.abs().sum() > 0 for t in ranks[0].values())  # training moved the adapter
    # every step of both ranks took its gradients through the server: at least each rank's 8 query rows per step
    assert served["grad_rows"] >= 2 * 4 * 8
    model = load_adapter(tmp_path, handle)  # rank 0 saved a loadable artifact
    assert model.trainable_parameters() > 0
