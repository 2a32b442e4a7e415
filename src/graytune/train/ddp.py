"""Data-parallel client training with torch DDP (gloo): several processes, one served backbone.

Each rank opens the backbone (usually ``http://...`` of a ``graytune serve``), draws
its own batches, and DDP averages the adapters' gradients across ranks, so every
rank holds the same adapter after every step. Rank 0 saves it.

Example (two processes on this machine, key in $GRAYTUNE_API_KEY)::

    torchrun --standalone --nproc-per-node 2 -m graytune.train.ddp \\
        --backbone http://127.0.0.1:8470 --method dga --data wordnet-supersense --max-steps 20 --out runs/ddp
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from graytune.artifacts import adapter_state, prepare_out, save_adapter
from graytune.methods import get_method
from graytune.model import AdaptedModel
from graytune.schedules import warmup_cosine
from graytune.train.arguments import add_train_arguments, run_spec
from graytune.train.recipe import RunSpec, describe, make_task, open_for, splits_for, warm_start
from graytune.train.trainer import seed_everything

log = logging.getLogger(__name__)


class _TaskLoss(nn.Module):
    """DDP synchronises gradients of what runs through its forward: here, the task's loss."""

    def __init__(self, model: AdaptedModel, task: Any) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch: Any) -> torch.Tensor:
        return self.task.loss(self.model, batch)


def train(run: RunSpec) -> dict[str, Any]:
    """Run on every rank of an initialised process group; returns this rank's summary.

    AdamW with the same warm-up-then-cosine schedule, weight decay and accumulation as
    ``graytune train``; no validation yet (``eval_every``/``patience`` are refused).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    method = get_method(run.method)
    config = replace(run.train, lr=run.train.lr if run.train.lr is not None else method.lr or 0.0)
    seed_everything(config.seed)  # the same initial adapter everywhere (DDP also broadcasts rank 0's)
    handle = open_for(run.backbone, run.access, run.method)
    splits = splits_for(run)
    task = make_task(splits, handle, run.image_size, loader=run.loader)
    model = warm_start(run, handle) if run.adapter else AdaptedModel.build(handle, run.method, run.options)
    ddp = DistributedDataParallel(_TaskLoss(model, task), find_unused_parameters=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                            weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, config.max_steps, config.warmup))
    generator = torch.Generator().manual_seed(config.seed + 1000 * rank)  # each rank its own batches
    batches = task.batches(config.batch_size, generator)
    losses = []
    for _ in range(config.max_steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(config.grad_accum):
            batch = next(batches, None)
            if batch is None:
                batches = task.batches(config.batch_size, generator)
                batch = next(batches)
            loss = ddp(batch) / config.grad_accum
            loss.backward()
            total += float(loss.detach())
        opt.step()
        sched.step()
        losses.append(total)
    if run.out:  # rank 0 writes the artifact (atomically, as a whole folder), then each rank its own copy
        if rank == 0:
            save_adapter(model, run.out, extra={"train": asdict(config), **describe(splits, task, run.data),
                                                "ddp_world_size": world})
        dist.barrier()
        save_file(adapter_state(model), str(Path(run.out) / f"rank{rank}.safetensors"))
        dist.barrier()
    return {"rank": rank, "world": world, "losses": losses, "samples_sent": handle.exposure.forward_samples}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m graytune.train.ddp", description=__doc__.split("\n")[0])
    add_train_arguments(p)  # the same flags as graytune train
    args = p.parse_args(argv)
    run = run_spec(args)
    if get_method(run.method).recipe not in ("fit", "none") or run.train.eval_every or run.train.patience:
        p.error("DDP trains tower adapters and white-box baselines without validation: --method transmiter+, "
                "--eval-every and --patience are for graytune train")
    if int(os.environ.get("RANK", "0")) == 0 and run.out:
        prepare_out(run.out, run.overwrite)  # before any rank works; init_process_group waits for this rank
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", "1"))))
    dist.init_process_group("gloo")
    try:
        summary = train(run)
        if args.json:
            print(json.dumps(summary, sort_keys=True))
        else:
            print(f"rank {summary['rank']}/{summary['world']}: final loss {summary['losses'][-1]:.4f}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
