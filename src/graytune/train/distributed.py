"""Data-parallel arithmetic, behind two names: ``world_position`` and ``average_gradients``.

The loop asks only these (and ``Task.batches``' ``shard``), so a library made for this job
(HF accelerate's ``Accelerator.gather``/``reduce``, Lightning Fabric's ``all_reduce``) can take
their place without touching it. They stay plain torch.distributed here: graytune's ranks share
one *served* backbone and sync only the adapters' few tensors, one all-reduce each, which those
libraries would wrap without removing (and accelerate would bring its own launcher, device
placement and checkpoint layout, which the run folder already defines).

Example:
    >>> rank, world = world_position()       # (0, 1) outside torchrun
    >>> loss = average_gradients(params, loss)     # the loss unchanged in one process
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def world_position() -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` unless a torch.distributed group is running."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(params: dict[str, torch.Tensor], loss: float) -> float:
    """Average every trainable tensor's gradient (and the logged loss) over the data-parallel ranks.

    Each rank's loss is the mean over its share of the global batch, so the average equals one
    process's gradient on the whole batch (for losses that are means over samples). In one
    process it changes nothing.
    """
    import torch.distributed as dist

    world = world_position()[1]
    if world == 1:
        return loss

    for p in params.values():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)
    total = torch.tensor([loss], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total) / world


def global_batch(batch_size: int) -> int:
    """Samples per forward over all ranks, each rank sending ``batch_size``."""
    return batch_size * world_position()[1]


def rank_batches(task: Any, batch_size: int, generator: torch.Generator) -> Iterator[Any]:
    """This rank's share of each global batch of an epoch: every rank draws the same global order."""
    rank, world = world_position()
    if world == 1:
        return task.batches(batch_size, generator)
    return task.batches(batch_size * world, generator, (rank, world))
