"""A training step over a slow link: loopback against a link of 50 ms round trip (``DelayProxy``), with the
synchronous client and with micro-batches in flight, side by side in one run.

One step: MiniLM at dark-gray behind ``graytune serve`` (a process of its own), a batch of ``batch`` rows x
``tokens`` token ids (the same shape as ``bench.serve``'s step), a shift at ``text.token_embeds`` and a linear
head with cross-entropy on the client, forward and backward. Three ways to run it:

- ``sync``: ``forward`` then ``loss.backward()`` (two round trips one after the other);
- ``chunks<c>``: ``forward_chunks(chunks=c)``, then ``loss.backward()`` (the chunks' VJPs at once);
- ``pipelined<c>``: ``forward_backward(loss_fn, chunks=c)`` (each chunk's VJP leaves as its loss is known).

Each way runs on both links back to back in interleaved rounds (the ways' order rotates and the links' order
alternates each round). Reported: median steps, the time the link adds to each way's step (the median over
rounds of the 50 ms step minus the loopback step just before or after it: robust on a loaded machine), and each
50 ms step's ratio to the synchronous loopback step of its round (issue 30's target: at most 1.15x).

Example:
    >>> print(format_report(run(rounds=5)))
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from typing import Any

import torch
from torch import nn

from graytune.access import open_backbone
from graytune.bench.delay_proxy import DelayProxy

__all__ = ["format_report", "run"]
KEY = "bench-key-0123456789abcdef"


def run(batch: int = 32, tokens: int = 64, chunks: tuple[int, ...] = (2, 4), one_way_ms: float = 25.0,
        rounds: int = 7, threads: int | None = 1) -> dict[str, Any]:
    """Median step times per way and link (see the module's docstring), and the links' measured round trips.

    ``threads``: torch threads of the server and of the client (``None``: torch's default); one each keeps a
    loaded machine's steps steadier (no parallel region waits on a descheduled thread).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    ways = ["sync", *(f"{kind}{c}" for c in chunks for kind in ("chunks", "pipelined"))]
    server = _Server(threads)
    try:
        with DelayProxy(server.url, one_way_ms / 1000) as slow_url:
            links = {"loopback": open_backbone(server.url, "dark-gray", api_key=KEY),
                     "50ms": open_backbone(slow_url, "dark-gray", api_key=KEY)}
            step = _Step(batch, tokens)
            for handle in links.values():  # warm: connections open, the backbone's first call done
                for way in ways:
                    step(handle, way)
            times: dict[tuple[str, str], list[float]] = {(w, k): [] for w in ways for k in links}
            for r in range(rounds):
                for way in ways[r % len(ways):] + ways[:r % len(ways)]:
                    for link in list(links)[::1 if r % 2 == 0 else -1]:
                        times[way, link].append(step(links[link], way))
            rtt = {k: _round_trip(h) for k, h in links.items()}
            for handle in links.values():
                handle.close()
    finally:
        server.stop()
    median = {f"{w}/{k}": statistics.median(v) for (w, k), v in times.items()}
    added = {w: statistics.median(s - f for s, f in zip(times[w, "50ms"], times[w, "loopback"])) for w in ways}
    over = {w: statistics.median(s / f for s, f in zip(times[w, "50ms"], times["sync", "loopback"])) for w in ways}
    return {"batch": batch, "tokens": tokens, "ways": ways, "one_way_ms": one_way_ms, "rounds": rounds,
            "round_trip_s": rtt, "step_s": median, "added_by_link_s": added, "over_sync_loopback": over,
            "torch_threads": torch.get_num_threads()}


class _Step:
    """One training step, timed: a fresh shift and head each time, the same batch and labels."""

    def __init__(self, batch: int, tokens: int) -> None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 20000, (batch, tokens), generator=g)
        self.inputs = {"text.input_ids": ids, "text.attention_mask": torch.ones_like(ids)}
        self.labels = torch.randint(0, 4, (batch,), generator=g)

    def __call__(self, handle: Any, way: str) -> float:
        shift = torch.zeros(1, 1, 384, requires_grad=True)
        head = nn.Linear(384, 4)
        edits = {"add": {"text.token_embeds": shift}, "outputs": ["text.embeds"]}
        n = len(self.labels)

        def loss_fn(out: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
            return nn.functional.cross_entropy(head(out["text.embeds"]), self.labels[rows], reduction="sum") / n

        kind = way.rstrip("0123456789")
        chunks = int(way[len(kind):] or 1)
        start = time.perf_counter()
        if kind == "pipelined":
            handle.forward_backward(self.inputs, loss_fn, chunks=chunks, **edits)
        else:
            out = (handle.forward(self.inputs, **edits) if kind == "sync"
                   else handle.forward_chunks(self.inputs, chunks=chunks, **edits))
            loss_fn(out, slice(0, n)).backward()
        took = time.perf_counter() - start
        if shift.grad is None or head.weight.grad is None:
            raise RuntimeError(f"the {way} step left no gradient")
        return took


def _round_trip(handle: Any, n: int = 5) -> float:
    """The median time of a request that does no work (``/v1/health``), in seconds."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        handle._request("GET", "/v1/health")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Server:
    """``graytune serve`` of MiniLM at dark-gray in a process of its own (its own GIL, as on a real network)."""

    def __init__(self, threads: int | None) -> None:
        context = mp.get_context("spawn")
        self.pipe, theirs = context.Pipe()
        self.proc = context.Process(target=_serve, args=(theirs, threads), daemon=True)
        self.proc.start()
        deadline = time.monotonic() + 300
        while not self.pipe.poll(0.5):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("the bench's server process ended or did not start within 300 s (its error is "
                                   "above); run the bench from a script guarded by if __name__ == '__main__'")
        self.url = str(self.pipe.recv())

    def stop(self) -> None:
        self.pipe.send("stop")
        self.proc.join(30)


def _serve(pipe: Any, threads: int | None) -> None:
    from graytune.serve import ApiKeys, ServeConfig, create_app
    from graytune.serve.runner import BackgroundServer

    if threads is not None:
        torch.set_num_threads(threads)

    app = create_app(open_backbone("minilm", "dark-gray"), ServeConfig(access="dark-gray"), ApiKeys({"bench": KEY}))
    with BackgroundServer(app) as url:
        pipe.send(url)
        pipe.recv()


def format_report(report: dict[str, Any]) -> str:
    """A markdown table: median step per way and link, and its ratio to the synchronous loopback step."""
    rtt = report["round_trip_s"]
    lines = [f"Training step over a slow link: MiniLM dark-gray, batch {report['batch']} x {report['tokens']} tokens, "
             f"shift + linear head, forward + backward; server in its own process; torch threads "
             f"{report['torch_threads']} each; {report['rounds']} interleaved "
             f"rounds; link: loopback ({rtt['loopback'] * 1000:.1f} ms round trip) vs DelayProxy "
             f"{report['one_way_ms']:g} ms each way ({rtt['50ms'] * 1000:.1f} ms measured)",
             "| way | loopback step | 50 ms step | added by the link | 50 ms step / sync loopback step |",
             "|---|---:|---:|---:|---:|"]
    step, added, over = report["step_s"], report["added_by_link_s"], report["over_sync_loopback"]
    for way in report["ways"]:
        lines.append(f"| {way} | {step[f'{way}/loopback'] * 1000:.0f} ms | {step[f'{way}/50ms'] * 1000:.0f} ms | "
                     f"{added[way] * 1000:+.0f} ms | {over[way]:.2f}x |")
    return "\n".join(lines)
