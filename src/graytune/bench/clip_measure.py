"""Measuring one CLIP-scale cell: a step's first-step peak memory and later steps' time, in a fresh process.

``python -m graytune.bench.clip_measure KIND PAYLOAD`` prints one JSON line: KIND ``cell`` (a
:class:`~graytune.bench.clip_cells.Cell` as a dict), ``interleaved`` (native vs DGA vs DGA recomputed, timed
round by round in one process) or ``cosine`` (the bf16-vs-fp32 VJP cosine). :func:`measure` runs one in such
a process and reads the line back. Beside them: the backbone's weight sizes and the machine's description.

- **memory**: the first step's peak (its optimizer state is created then). On CPU, the torch profiler's
  allocation events (``eval.profiling.peak_tensor_mb``); on CUDA, ``torch.cuda.max_memory_allocated``
  less what was allocated before the step (the raw figure, weights included, is kept as
  ``allocated_peak_mb``).
- **time**: the median of ``steps`` steps after the measured one and ``warmup`` more.

Example:
    >>> row = measure("cell", asdict(Cell("clip-tiny", "dga", "fp32", False, 2, "cpu")), isolate=True)
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from graytune.access import open_backbone
from graytune.bench.clip_cells import CONTEXT, NATIVE, Cell, build_step, clip_batch
from graytune.devices import parse_device
from graytune.eval.profiling import peak_tensor_mb

log = logging.getLogger(__name__)
Tensor = torch.Tensor


def measure_cell(cell: Cell) -> dict[str, Any]:
    """Peak memory of the first step and the median time of later ones (run it in a fresh process)."""
    torch.manual_seed(0)
    device = parse_device(cell.device)
    step, trainable = build_step(cell)
    row: dict[str, Any] = {"trainable": trainable, **_first_step_memory(step, device)}
    for _ in range(cell.warmup if cell.steps else 0):  # warm-up only before timed steps
        step()
    times = [_timed(step, device) for _ in range(cell.steps)]
    row.update(time_s=statistics.median(times) if times else None, times_s=times)
    return row


def interleaved_times(arch: str, batch: int, dtype: str, device: str, rounds: int) -> dict[str, Any]:
    """Step seconds of the native step, DGA, and DGA under owner recomputation, interleaved in one process.

    Load from anything else on the machine then hits the three alike (separate processes run minutes
    apart). Each step runs once untimed first; the order rotates every round; ratios are of medians.
    """
    torch.manual_seed(0)
    where = parse_device(device)
    steps = {name: build_step(Cell(arch, method, dtype, on, batch, device))[0]
             for name, method, on in (("native", NATIVE, False), ("dga", "dga", False), ("dga_recompute", "dga", True))}
    names = list(steps)
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(_timed(steps[name], where))
    median = {name: statistics.median(v) for name, v in times.items()}
    return {"rounds": rounds, "seconds": median, "all_s": times, "dga_vs_native": median["dga"] / median["native"],
            "dga_recompute_vs_native": median["dga_recompute"] / median["native"]}


def _first_step_memory(step: Callable[[], None], device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {"step_peak_mb": peak_tensor_mb(step)}
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)  # weights, adapters, the batch
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"step_peak_mb": (peak - before) / 2**20, "allocated_peak_mb": peak / 2**20, "resident_mb": before / 2**20}


def _timed(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def vjp_cosine(arch: str, batch: int, device: str, dtype: str = "bf16") -> dict[str, float]:
    """Cosine between the fp32 and ``dtype`` handles' VJPs at the pixels and token embeddings (one fixed batch).

    Both dark-gray handles get the same batch, a zero ``[B, 77, D]`` delta added at ``text.token_embeds``
    (so the VJP at every token embedding comes back) and the same fixed random cotangents on both
    towers' embeddings; the embeddings' own cosines are reported beside.
    """
    found: dict[str, list[Tensor]] = {}
    for precision in ("fp32", dtype):
        handle = open_backbone(f"arch:{arch}", "dark-gray", device=device, dtype=precision)
        pixels, tokens = clip_batch(handle, batch)
        width = int(handle.spec.port("text.token_embeds").shape[-1])
        pixels.requires_grad_(True)
        delta = torch.zeros(batch, CONTEXT, width, device=pixels.device, requires_grad=True)  # [B, 77, D]
        out = handle.forward({"image.pixels": pixels, **tokens}, add={"text.token_embeds": delta},
                             outputs=["image.embeds", "text.embeds"])
        g = torch.Generator().manual_seed(1)
        cotangents = [torch.randn(out[p].shape, generator=g).to(pixels.device) for p in ("image.embeds", "text.embeds")]
        vjps = torch.autograd.grad([out["image.embeds"], out["text.embeds"]], [pixels, delta], cotangents)
        found[precision] = [*vjps, out["image.embeds"].detach(), out["text.embeds"].detach()]
        del handle, out
    names = ("image.pixels", "text.token_embeds", "image.embeds", "text.embeds")
    return {"dtype": dtype, **{name: F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()
                               for name, a, b in zip(names, found["fp32"], found[dtype])}}


def measure(kind: str, payload: dict[str, Any], isolate: bool) -> dict[str, Any]:
    """One measurement, in a fresh process unless ``isolate`` is off; ``{"error": ...}`` when it failed."""
    if isolate:
        return _in_fresh_process(kind, payload)
    try:
        return MEASUREMENTS[kind](payload)
    except Exception as err:  # noqa: BLE001  (a failed cell is reported in its row, as in a fresh process)
        log.warning("%s %s failed", kind, payload, exc_info=True)
        return {"error": f"{type(err).__name__}: {err}"}


def _in_fresh_process(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """``python -m graytune.bench.clip_measure KIND PAYLOAD``'s JSON line, or ``{"error": ...}`` when it failed."""
    proc = subprocess.run([sys.executable, "-m", "graytune.bench.clip_measure", kind, json.dumps(payload)],
                          capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        log.warning("%s %s failed:\n%s", kind, payload, proc.stderr[-4000:])
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def weights(arch: str) -> dict[str, Any]:
    """The backbone's parameter count, image size, and the bytes of one copy of its state per dtype name (MB)."""
    handle = open_backbone(f"arch:{arch}", "white-box", device="cpu")  # counted here; measured in the cells
    module = handle.module()
    state = module.state_dict().values()
    floating = sum(t.numel() for t in state if t.is_floating_point())
    other = sum(t.numel() * t.element_size() for t in state if not t.is_floating_point())
    sizes = {name: (floating * dtype.itemsize + other) / 2**20
             for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16"))}
    return {"params": sum(p.numel() for p in module.parameters()),
            "image_size": int(handle.spec.port("image.pixels").shape[-1]), "mb": sizes}


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "cores": os.cpu_count(), "cpu": _cpu_name(),
                            "device": str(device), "date": datetime.date.today().isoformat(),
                            "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=props.total_memory / 2**30, cuda=torch.version.cuda)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


MEASUREMENTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "cell": lambda p: measure_cell(Cell(**p)),
    "cosine": lambda p: vjp_cosine(**p),
    "interleaved": lambda p: interleaved_times(**p),
}
"""What ``python -m graytune.bench.clip_measure KIND PAYLOAD`` measures, by KIND."""


def _main(argv: Sequence[str]) -> None:
    kind, payload = argv[0], json.loads(argv[1])
    if kind not in MEASUREMENTS:
        raise SystemExit(f"unknown measurement {kind!r}; use one of {', '.join(MEASUREMENTS)}")
    print(json.dumps(MEASUREMENTS[kind](payload)))


if __name__ == "__main__":
    _main(sys.argv[1:])
