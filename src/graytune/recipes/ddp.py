"""Data-parallel client training (torch.distributed, gloo): several processes, one served backbone.

The same recipe and training loop as ``graytune train``, with the same flags: warm-up,
accumulation, validation, early stopping, checkpoints and resume are identical. Each rank
opens the backbone (usually ``http://...`` of a ``graytune serve``) and takes its share of
every global batch (``--batch-size`` per rank); the trainer averages the adapters'
gradients across ranks, so every rank holds the same adapter after every step, and a run
on 2 ranks × batch B equals one process × batch 2B (for losses that are per-sample means:
classification; contrastive retrieval sees in-batch negatives per rank). Rank 0 tests and
saves.

Example (two processes on this machine, key in $GRAYTUNE_API_KEY)::

    torchrun --standalone --nproc-per-node 2 -m graytune.recipes.ddp \\
        --backbone http://127.0.0.1:8470 --method dga --data wordnet-supersense --max-steps 20 --out runs/ddp
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from graytune.artifacts import adapter_state
from graytune.methods import get_method
from graytune.recipes.arguments import add_train_arguments, run_spec
from graytune.recipes.run import RunSpec, train_model
from graytune.runs import prepare_out, rank_weights_name

log = logging.getLogger(__name__)


def train(run: RunSpec) -> dict[str, Any]:
    """``graytune train``'s recipe on every rank of an initialised process group; this rank's summary.

    The trainer sees the process group: each rank takes its share of every global batch
    (``--batch-size`` per rank), gradients are averaged across ranks, rank 0 writes the
    checkpoint, history and artifact. Every rank then leaves its adapter in ``rank<r>.safetensors``
    beside the artifact, so a run can show that the ranks agree.
    """
    rank = dist.get_rank()
    summary, model = train_model(run, progress=rank == 0)
    if run.out:
        dist.barrier()  # the artifact is in place
        save_file(adapter_state(model), str(Path(run.out) / rank_weights_name(rank)))
        dist.barrier()
    return {**summary, "rank": rank, "samples_sent": model.handle.exposure.forward_samples}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m graytune.recipes.ddp", description=__doc__.split("\n")[0])
    add_train_arguments(p)  # the same flags as graytune train
    args = p.parse_args(argv)
    run = run_spec(args)
    if not get_method(run.method).made_by.fits:
        p.error(f"--method {run.method} is not trained by the gradient trainer; DDP runs graytune train's methods")
    if int(os.environ.get("RANK", "0")) == 0 and run.out:
        prepare_out(run.out, run.overwrite)  # before any rank works; init_process_group waits for this rank
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", "1"))))
    dist.init_process_group("gloo")
    try:
        summary = train(run)
        if summary["rank"] == 0:
            print(json.dumps(summary, sort_keys=True) if args.json else
                  f"{summary['world_size']} ranks, {summary['steps']} steps; test {summary['test']}; "
                  f"saved to {run.out}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
