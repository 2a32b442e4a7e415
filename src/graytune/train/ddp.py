"""Data-parallel client training with torch DDP (gloo): several processes, one served backbone.

Each rank opens the backbone (usually ``http://...`` of a ``graytune serve``), draws
its own batches, and DDP averages the adapters' gradients across ranks, so every
rank holds the same adapter after every step. Rank 0 saves it.

Example (two processes on this machine, key in $GRAYTUNE_API_KEY)::

    torchrun --standalone --nproc-per-node 2 -m graytune.train.ddp \\
        --backbone http://127.0.0.1:8470 --method dga --data wordnet-supersense --steps 20 --out runs/ddp
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from graytune.artifacts import adapter_state, save_adapter
from graytune.data.catalog import load_splits
from graytune.model import AdaptedModel
from graytune.train.recipe import make_task, open_for
from graytune.train.trainer import seed_everything

log = logging.getLogger(__name__)


class _TaskLoss(nn.Module):
    """DDP synchronises gradients of what runs through its forward: here, the task's loss."""

    def __init__(self, model: AdaptedModel, task: Any) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch: Any) -> torch.Tensor:
        return self.task.loss(self.model, batch)


def train(backbone: str, access: str, method: str, data: str, steps: int, batch_size: int, lr: float, seed: int,
          out: str | None, task_name: str | None = None) -> dict[str, Any]:
    """Run on every rank of an initialised process group; returns this rank's summary."""
    rank, world = dist.get_rank(), dist.get_world_size()
    seed_everything(seed)  # the same initial adapter everywhere (DDP also broadcasts rank 0's)
    handle = open_for(backbone, access, method)
    splits = load_splits(data, task_name)
    task = make_task(splits, handle, None)
    model = AdaptedModel.build(handle, method)
    ddp = DistributedDataParallel(_TaskLoss(model, task), find_unused_parameters=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed + 1000 * rank)  # each rank its own batches
    batches = task.batches(batch_size, generator)
    losses = []
    for _ in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = task.batches(batch_size, generator)
            batch = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = ddp(batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    if out:  # rank 0 writes the artifact (atomically, as a whole folder), then each rank its own copy
        if rank == 0:
            save_adapter(model, out, extra={"data": data, "task": splits.task, "ddp_world_size": world})
        dist.barrier()
        save_file(adapter_state(model), str(Path(out) / f"rank{rank}.safetensors"))
        dist.barrier()
    return {"rank": rank, "world": world, "losses": losses, "samples_sent": handle.exposure.forward_samples}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m graytune.train.ddp", description=__doc__.split("\n")[0])
    p.add_argument("--backbone", required=True)
    p.add_argument("--access", default="dark-gray")
    p.add_argument("--method", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--task", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", "1"))))
    dist.init_process_group("gloo")
    try:
        summary = train(args.backbone, args.access, args.method, args.data, args.steps, args.batch_size, args.lr,
                        args.seed, args.out, args.task)
        print(f"rank {summary['rank']}/{summary['world']}: final loss {summary['losses'][-1]:.4f}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
