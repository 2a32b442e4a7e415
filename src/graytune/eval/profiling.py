"""Peak tensor memory of a piece of work, from the torch profiler's allocation events.

Exact for tensors, unlike RSS, which the C allocator's caching blurs by tens of MB.

Example:
    >>> peak_tensor_mb(lambda: loss_fn().backward())
    212.4
"""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def peak_tensor_mb(work: Callable[[], object]) -> float:
    """The most tensor memory held at once during ``work()``, above what was held before it (MB)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20
