"""One training loop for one process and for data-parallel ranks: 2 gloo ranks × batch B equal 1 × batch 2B."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from graytune.cli.main import main
from tests.cli.test_transfer_cli import image_folder


def test_two_ranks_equal_one_process_with_the_double_batch(tiny_clip_dir, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = image_folder(tmp_path / "imgs")  # 3 classes x 10 images: a per-sample-mean (classification) loss
    flags = ["--backbone", f"hf-clip:{tiny_clip_dir}", "--method", "dga", "--data", data, "--max-steps", "3",
             "--eval-every", "3", "--seed", "4", "--lr", "0.01", "--json"]
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "graytune.recipes.ddp",
                           *flags, "--batch-size", "4", "--out", str(tmp_path / "ddp")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert main(["train", *flags, "--batch-size", "8", "--out", str(tmp_path / "one")]) == 0
    single = json.loads(capsys.readouterr().out)
    ranks = [load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors")) for r in range(2)]
    one = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert set(ranks[0]) == set(one)
    for key in one:
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # the ranks agree exactly
        torch.testing.assert_close(ranks[0][key], one[key], atol=1e-5, rtol=1e-4)  # and match one process
    assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in one.items() if "linear.weight" in k)
    histories = [[json.loads(x) for x in (tmp_path / d / "history.jsonl").read_text().splitlines()]
                 for d in ("ddp", "one")]
    losses = [[e["loss"] for e in h if e["event"] == "step"] for h in histories]
    assert len(losses[0]) == 3 and all(abs(a - b) < 1e-4 for a, b in zip(*losses))  # the same loss, step by step
    assert summary["test"] == single["test"]
