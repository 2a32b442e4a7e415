"""Peak tensor memory of a piece of work, from the torch profiler's allocation events.

Exact for tensors, unlike RSS, which the C allocator's caching blurs by tens of MB.

Example:
    >>> peak_tensor_mb(lambda: loss_fn().backward())
    212.4
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch.profiler import ProfilerActivity, profile

KINETO_NOISE = (b"USDT:",)
"""Prefixes of the lines kineto's C++ logger writes straight to file descriptor 2 on every profiler
start and stop (``USDT:... SyncActivityProfilerHandler.cpp:52] profiler_start``); they are markers for
tracing tools, not messages for a user, and no log level of ours reaches them."""


def peak_tensor_mb(work: Callable[[], object]) -> float:
    """The most tensor memory held at once during ``work()``, above what was held before it (MB)."""
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _without_kineto_markers():
        prof.__enter__()  # start; the context-manager halves, so that the markers can be caught
    try:
        work()  # its own stderr (warnings, progress bars) goes through untouched
    finally:
        with _without_kineto_markers():
            prof.__exit__(None, None, None)  # stop
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20


@contextmanager
def _without_kineto_markers() -> Iterator[None]:
    """Catch what is written to file descriptor 2 inside the block; pass on all but kineto's marker lines.

    fd 2 is restored even when the block raises. Anything else written meanwhile (by any thread)
    reaches stderr when the block ends.
    """
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all: nothing can reach a terminal
        yield
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().splitlines(keepends=True) if not line.startswith(KINETO_NOISE)]
            if kept:
                os.write(2, b"".join(kept))
