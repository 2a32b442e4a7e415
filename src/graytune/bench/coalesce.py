"""Coalescing measured as a curve (``graytune bench --coalesce``): N concurrent training clients against one server
with ``--coalesce-ms`` on and off, side by side in one run.

Each client is a process of its own (one torch thread) running training steps (forward with a DGA-like shift and
two inserted tokens, then the VJP) on MiniLM at dark-gray over loopback; each cell of the clients x batch grid is timed with
coalescing off and on in alternating rounds, on two servers over the same backbone. Reported per cell: aggregate
samples per second both ways and their ratio, and each client's median step latency both ways and its solo
latency (one client, coalescing off). The crossover is the first batch, per client count, where coalescing stops
paying (ratio below 1).

Example:
    >>> report = run(clients=(4, 16), batches=(1, 4, 64), window_ms=10.0)
    >>> print(format_report(report))
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from typing import Any

import torch

from graytune.access import open_backbone
from graytune.serve import ApiKeys, ServeConfig, create_app
from graytune.serve.runner import BackgroundServer

__all__ = ["format_report", "run"]
KEY = "bench-key-0123456789abcdef"
TEXT = "a short sentence of about twelve tokens for each row of the batch"


def run(clients: tuple[int, ...] = (4, 16), batches: tuple[int, ...] = (1, 4, 64), window_ms: float = 10.0,
        steps: int = 3, rounds: int = 2, device: str | None = None) -> dict[str, Any]:
    """The grid (see the module's docstring); ``steps`` per client per round, ``rounds`` alternations; the server's
    backbone on ``device`` (default: CUDA when present, else CPU; the clients stay on the CPU)."""
    local = open_backbone("minilm", "dark-gray", device=device)
    keys = ApiKeys({f"c{i}": f"{KEY}-{i:04d}" for i in range(max(clients))})
    apps = {on: create_app(local, ServeConfig(access="dark-gray", coalesce_ms=window_ms if on else 0.0,
                                              max_queue=4 * max(clients)), keys)
            for on in (False, True)}
    cells, pool = [], _Clients(max(clients))
    with BackgroundServer(apps[False]) as off_url, BackgroundServer(apps[True]) as on_url:
        urls = {False: off_url, True: on_url}
        for batch in batches:
            solo = statistics.median(pool.latencies(urls[False], 1, batch, steps)[1] for _ in range(rounds))
            for n in clients:
                figures: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
                for r in range(rounds):
                    for on in ((False, True) if r % 2 == 0 else (True, False)):
                        figures[on].append(pool.latencies(urls[on], n, batch, steps))
                rate = {on: statistics.median(f[0] for f in figures[on]) for on in figures}
                p50 = {on: statistics.median(f[1] for f in figures[on]) for on in figures}
                cells.append({"clients": n, "batch": batch, "samples_per_s_off": rate[False],
                              "samples_per_s_on": rate[True], "ratio": rate[True] / rate[False],
                              "p50_step_s_off": p50[False], "p50_step_s_on": p50[True], "solo_step_s": solo,
                              "p50_over_solo_on": p50[True] / solo})
    pool.close()
    joiner = apps[True].state.service.joiner
    return {"window_ms": window_ms, "steps": steps, "rounds": rounds, "cells": cells, "device": str(local.device),
            "joined_requests": joiner.joined, "joined_calls": joiner.calls,
            "torch_threads": torch.get_num_threads()}


class _Clients:
    """``n`` client processes (the server's GIL is its own, as on a real network), each training through a
    server when asked; ``latencies`` times ``n`` of them at once."""

    def __init__(self, n: int) -> None:
        context = mp.get_context("spawn")
        self.pipes, self.procs = [], []
        for _ in range(n):
            ours, theirs = context.Pipe()
            proc = context.Process(target=_client_loop, args=(theirs,), daemon=True)
            proc.start()
            self.pipes.append(ours)
            self.procs.append(proc)

    def latencies(self, url: str, n: int, batch: int, steps: int) -> tuple[float, float]:
        """Samples per second of ``n`` clients of ``batch`` rows, ``steps`` steps each, at once, and the median
        step latency."""
        pipes = self.pipes[:n]
        for i, pipe in enumerate(pipes):
            pipe.send(("prepare", url, f"{KEY}-{i:04d}", batch))
        for pipe in pipes:
            pipe.recv()  # warmed up: connected, one step taken
        start_at = time.time() + 0.2
        for pipe in pipes:
            pipe.send(("go", start_at, steps))
        times = [pipe.recv() for pipe in pipes]
        wall = max(t[1] for t in times) - start_at
        return n * steps * batch / wall, statistics.median(x for t in times for x in t[0])

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(("stop",))
        for proc in self.procs:
            proc.join(10)


def _client_loop(pipe: Any) -> None:
    """A client process: prepare (open the backbone, one step), then on ``go`` run the timed steps."""
    torch.set_num_threads(1)
    handle, texts = None, []
    while True:
        order = pipe.recv()
        if order[0] == "stop":
            return
        if order[0] == "prepare":
            _, url, key, batch = order
            handle = open_backbone(url, "dark-gray", api_key=key)
            texts = [f"{TEXT} (row {r})" for r in range(batch)]  # distinct rows: no duplicate-row records
            _step(handle, texts)
            pipe.send("ready")
            continue
        _, start_at, steps = order
        time.sleep(max(0.0, start_at - time.time()))
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            _step(handle, texts)
            times.append(time.perf_counter() - t0)
        pipe.send((times, time.time()))


def _step(handle: Any, texts: list[str]) -> None:
    shift = torch.zeros(1, 1, 384, requires_grad=True)
    tokens = torch.zeros(1, 2, 384, requires_grad=True)
    z = handle.forward({"text": texts}, add={"text.token_embeds": shift}, insert={"text.token_embeds": tokens})
    z["text.embeds"].square().sum().backward()


def format_report(report: dict[str, Any]) -> str:
    lines = [f"Coalescing (--coalesce-ms {report['window_ms']:g}), MiniLM dark-gray on {report.get('device', 'cpu')}, "
             "forward + VJP per step, loopback; "
             f"{report['steps']} steps x {report['rounds']} interleaved rounds per cell",
             "| clients | batch | samples/s off | samples/s on | on/off | p50 step off | p50 step on | solo step | "
             "p50 on/solo |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in report["cells"]:
        lines.append(f"| {c['clients']} | {c['batch']} | {c['samples_per_s_off']:.1f} | {c['samples_per_s_on']:.1f} | "
                     f"{c['ratio']:.2f}x | {c['p50_step_s_off'] * 1000:.0f} ms | {c['p50_step_s_on'] * 1000:.0f} ms | "
                     f"{c['solo_step_s'] * 1000:.0f} ms | {c['p50_over_solo_on']:.2f}x |")
    for n in sorted({c["clients"] for c in report["cells"]}):
        losing = [c["batch"] for c in report["cells"] if c["clients"] == n and c["ratio"] < 1]
        lines.append(f"crossover at {n} clients: " + (f"coalescing stops paying from batch {min(losing)}" if losing
                                                       else "none in this grid (coalescing pays at every batch)"))
    return "\n".join(lines)
