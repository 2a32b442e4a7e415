"""A/B of one EfficientNet-Lite0 adapter step, timed three ways in interleaved rounds, and the boundary's
finiteness check of the pixels, the old way against the one it uses now (docs/benchmarks.md).

- ``boundary``: through a dark-gray handle, the backbone one autograd node (``graytune bench``'s case);
- ``plain``: the same adapter by ordinary autograd through the white-box module (the bench's reference);
- ``direct``: the owner's own forward code without the boundary's autograd node: a white-box handle's
  ``forward`` runs the backbone's ports in plain autograd (after the same input checks).

Run: .venv/bin/python scripts/boundary_ab.py   (medians in seconds; a few minutes on 2 cores)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from graytune import open_backbone
from graytune.access.checks import all_finite
from graytune.bench.cases import CASES

ROUNDS = 14


def pixels(batch: int = 32, size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The bench case's batch: 32 random images of 128 px and their labels (seed 0)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g)


def pixel_adapter() -> nn.Conv2d:
    """The bench case's adapter: a 3x3 conv on the pixels, initialised to the identity."""
    conv = nn.Conv2d(3, 3, 3, padding=1)
    nn.init.dirac_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def direct_step() -> Callable[[], None]:
    """One AdamW step of the adapter through the owner's forward code, without the boundary's autograd node."""
    handle = open_backbone("efficientnet-lite0", access="white-box")
    x, y = pixels()
    conv = pixel_adapter()
    opt = torch.optim.AdamW(conv.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(handle.forward({"image.pixels": conv(x)}, outputs=["logits"])["logits"], y).backward()
        opt.step()

    return step


def interleaved(steps: dict[str, Callable[[], None]], rounds: int = ROUNDS) -> dict[str, float]:
    """Each step's median time over ``rounds``, the order rotated every round (after two warm-up calls each)."""
    for step in steps.values():
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        order = list(steps.items())
        order = order[r % len(order):] + order[:r % len(order)]
        for name, step in order:
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def per_call(f: Callable[[], object], n: int = 50) -> float:
    f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n


def main() -> None:
    case = CASES["efficientnet-lite0"]
    medians = interleaved({"boundary": case.boundary(), "plain": case.plain(), "direct": direct_step()})
    for name, seconds in medians.items():
        print(name, round(seconds, 4))
    x, _ = pixels()
    print("isfinite(x).all() ms", round(1e3 * per_call(lambda: bool(torch.isfinite(x).all())), 2),
          "all_finite(x) ms", round(1e3 * per_call(lambda: all_finite(x)), 2))


if __name__ == "__main__":
    main()
