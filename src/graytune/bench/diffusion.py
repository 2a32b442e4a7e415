"""One training step of a text-to-image diffusion model per method: peak memory and time, as ratios to full
fine-tuning (``graytune bench --diffusion-only``; ``--diffusion`` adds it to the whole run).

The seed's claim in its generative setting ("over 60 % less GPU memory" than fine-tuning): ``dga``, ``lga``,
``lora`` and ``full`` UNet fine-tuning, each with owner recomputation off and on, on ``arch:sd15-random`` (Stable
Diffusion 1.5's shape, random weights: memory and time do not depend on the weights' values). The step is
``diffusion_steps.build_step``'s: the UNet's prediction for noisy latents, the MSE to the noise, backward, AdamW.

- **memory**: the first step's peak (its gradients and optimizer state are created then), each cell in a fresh
  process. On CPU, the torch profiler's allocation events (``eval.profiling.peak_tensor_mb``); on CUDA,
  ``torch.cuda.max_memory_allocated`` less what was allocated before the step. ``total_mb`` = one copy of the
  pipeline's weights (text encoder, UNet and VAE: resident for every method, and the copy full fine-tuning trains)
  + the step's peak (activations; gradients and AdamW's two moments of whatever trains). Before its step, full
  fine-tuning checks that the device has room for a gradient and two moments per UNet weight, and reports that it
  does not fit instead of taking the machine's memory from others.
- **time**: the median of ``steps`` steps after the measured one and ``warmup`` more (the measured step is itself
  a warm-up: its optimizer state exists afterwards).

Defaults: on CPU batch 1, on CUDA batch 8; the backbone's own image size (SD 1.5: 512 px, latents 64 x 64).

Example:
    >>> results = run("arch:sd-tiny", batch=1, size=32, device="cpu", isolate=False, progress=False)
    >>> print(format_report(results))
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import torch

from graytune.bench.clip_measure import _first_step_memory, _timed, machine
from graytune.bench.diffusion_steps import METHODS, DiffusionCell, build_step
from graytune.bench.lm import _available_mb
from graytune.devices import parse_device
from graytune.errors import InvalidInputError
from graytune.methods import MethodKind, get_method

log = logging.getLogger(__name__)

BACKBONE = "arch:sd15-random"
LABELS = {"arch:sd15-random": "Stable Diffusion 1.5's shape, random weights",
          "arch:sd-tiny": "tiny random Stable Diffusion pipeline (mechanics only)"}
"""How the report names a backbone."""
GPU_BATCH, CPU_BATCH = 8, 1


def measure_cell(cell: DiffusionCell) -> dict[str, Any]:
    """Peak memory of the first step and the median time of later ones (run it in a fresh process)."""
    torch.manual_seed(0)
    device = parse_device(cell.device)
    step, info = build_step(cell)
    if cell.method == "full":
        short = _no_room(3 * info["unet_mb"], info["unet_params"], device)
        if short:
            return {**info, "error": short}
    row: dict[str, Any] = {**info, **_first_step_memory(step, device)}
    for _ in range(cell.warmup if cell.steps else 0):
        step()
    times = [_timed(step, device) for _ in range(cell.steps)]
    row.update(time_s=statistics.median(times) if times else None, times_s=times)
    if device.type == "cpu":  # the whole process, weights and both copies of a white-box build included: context
        row["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def _no_room(needed_mb: float, params: int, device: torch.device) -> str:
    """Why a step adding ``needed_mb`` of gradients and moments cannot run on ``device`` ("" when it can, or
    unknown)."""
    available = torch.cuda.mem_get_info(device)[0] / 2**20 if device.type == "cuda" else _available_mb()
    margin = 1.2 * needed_mb + 512  # activations, AdamW's temporaries
    if available is None or available >= margin:
        return ""
    return (f"does not fit: full fine-tuning with AdamW adds a gradient and two moments per UNet weight, about "
            f"{needed_mb / 1024:.1f} GiB for {params / 1e9:.2f} B weights, and {device.type} has "
            f"{available / 1024:.1f} GiB available")


def measure(cell: DiffusionCell, isolate: bool) -> dict[str, Any]:
    """One cell, in a fresh process unless ``isolate`` is off; ``{"error": ...}`` when it failed."""
    if not isolate:
        try:
            return measure_cell(cell)
        except Exception as err:  # noqa: BLE001  (reported in its row, as from a fresh process)
            log.warning("%s failed", cell, exc_info=True)
            return {"error": f"{type(err).__name__}: {err}"}
    proc = subprocess.run([sys.executable, "-m", "graytune.bench.diffusion", json.dumps(asdict(cell))],
                          capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        log.warning("%s failed:\n%s", cell, proc.stderr[-4000:])
        killed = f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0 else ""
        return {"error": killed or (lines[-1] if lines else f"exit status {proc.returncode}")}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan_cells(backbone: str, batch: int, size: int | None, device: str, methods: Sequence[str],
               recompute: Sequence[bool], steps: int, warmup: int) -> list[DiffusionCell]:
    """Every cell: each method (``full`` always, the reference) at each recomputation setting."""
    for name in methods:  # before any long work
        method = get_method(name)
        why = ("adapts class scores" if method.kind is MethodKind.LOGIT else
               "trains from forward calls alone (zeroth-order)" if method.zeroth_order else "")
        if why:
            raise InvalidInputError(f"method {name!r} {why}, not by one AdamW step on a backward pass; the diffusion "
                                    f"bench measures {', '.join(METHODS)} and others trained that way")
    wanted = list(dict.fromkeys([*methods, "full"]))
    return [DiffusionCell(backbone, m, on, batch, size, device, steps, warmup) for m in wanted
            for on in dict.fromkeys(recompute)]


def run(backbone: str = BACKBONE, batch: int | None = None, size: int | None = None, device: str | None = None,
        methods: Sequence[str] = METHODS, recompute: Sequence[bool] = (False, True), steps: int | None = None,
        warmup: int | None = None, isolate: bool = True, progress: bool = True) -> dict[str, Any]:
    """Every cell's memory and time, and their ratios to full fine-tuning without recomputation; plain data for JSON.

    Args:
        backbone: a diffusion backbone id (``arch:sd15-random``, ``arch:sd-tiny``, ``hf-diffusion:<dir>``).
        batch: images per step (default: 8 on CUDA, 1 on CPU).
        size: image side in pixels, a multiple of the VAE's factor (default: the backbone's, 512 for SD 1.5).
        device: ``cpu``, ``cuda`` or ``cuda:N`` (default: CUDA when present).
        methods: methods to measure; ``full`` always runs.
        recompute: owner recomputation settings.
        steps, warmup: timed steps after the measured one, and untimed ones between (default: 3 and 1 on CUDA,
            1 and 0 on CPU).
        isolate: each cell in a fresh process (off: in this one, for tests).
        progress: a progress bar on stderr.
    """
    from tqdm.auto import tqdm

    where = parse_device(device)
    gpu = where.type == "cuda"
    batch = batch or (GPU_BATCH if gpu else CPU_BATCH)
    steps = (3 if gpu else 1) if steps is None else steps
    warmup = (1 if gpu else 0) if warmup is None else warmup
    cells = plan_cells(backbone, batch, size, str(where), methods, recompute, steps, warmup)
    about = machine(where)  # its load average now, before the cells
    rows = []
    for cell in tqdm(cells, desc="diffusion cells", unit="cell", disable=not progress):
        row = measure(cell, isolate)
        log.info("%s: %s", cell, row)
        rows.append({"method": cell.method, "recompute": cell.recompute, **row})
    results: dict[str, Any] = {"machine": about, **_table(rows),
                               "settings": {**asdict(replace(cells[0], method="*", recompute=False)),
                                            "recompute": list(dict.fromkeys(recompute)), "isolated": isolate,
                                            "label": LABELS.get(backbone, backbone),
                                            "loss": "MSE of the UNet's prediction to the noise",
                                            "optimizer": "AdamW at each method's registry rate"}}
    results["machine"]["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return results


def _table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``rows`` with totals and ratios to full fine-tuning without recomputation (its total, step peak, time)."""
    sized = [r for r in rows if "weights_mb" in r and r["method"] == "full"] or [r for r in rows if "weights_mb" in r]
    weights = sized[0]["weights_mb"] if sized else None
    for row in rows:
        if weights is not None and "step_peak_mb" in row:
            row["total_mb"] = weights + row["step_peak_mb"]
    ref = next((r for r in rows if r["method"] == "full" and not r["recompute"] and "total_mb" in r), None)
    for row in rows:
        for key, of in (("vs_full", "total_mb"), ("step_vs_full", "step_peak_mb"), ("time_vs_full", "time_s")):
            if ref is not None and row.get(of) is not None and ref.get(of):
                row[key] = row[of] / ref[of]
    return {"weights_mb": weights, "params": sized[0]["params"] if sized else None,
            "unet_params": sized[0]["unet_params"] if sized else None,
            "latents": next((r["latents"] for r in rows if "latents" in r), None), "rows": rows}


def format_report(results: dict[str, Any]) -> str:
    """A heading line and a markdown table of every cell (what the command prints)."""
    m, s = results["machine"], results["settings"]
    load, end = (m.get("load_avg") or ["?"])[0], (m.get("load_avg_end") or ["?"])[0]
    where = m.get("gpu") or f"CPU {m['cpu']}, {m['cores']} cores, {m['threads']} threads"
    size = (f"{results['params'] / 1e6:.1f} M params ({results['unet_params'] / 1e6:.1f} M in the UNet), weights "
            f"{results['weights_mb']:.0f} MB" if results["weights_mb"] else "weights not measured")
    latents = "x".join(str(n) for n in results["latents"][1:]) if results["latents"] else "?"
    lines = [f"diffusion training step: {s['backbone']} ({s['label']}), {size}; batch {s['batch']}, latents {latents}",
             f"{where}; torch {m['torch']}; measured {m['date']}; 1-min load average {_num(load, 1)} at the start, "
             f"{_num(end, 1)} at the end", "",
             "| method | recompute | trainable | step peak MB | total MB | total / full | step peak / full | "
             "time s | time / full |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        head = f"| {row['method']} | {'on' if row['recompute'] else 'off'} | {row.get('trainable', 0):,} |"
        if "error" in row:
            lines.append(f"{head} {row['error']} |||||")
            continue
        lines.append(f"{head} {row['step_peak_mb']:,.0f} | {_num(row.get('total_mb'), 0, ',')} | "
                     f"{_num(row.get('vs_full'), 3)} | {_num(row.get('step_vs_full'), 3)} | "
                     f"{_num(row.get('time_s'), 2)} | {_num(row.get('time_vs_full'), 2)} |")
    lines += ["", "One step: the UNet's prediction for noisy latents (prompts of 77 token positions), MSE to the "
                  "noise, backward, AdamW at the method's registry rate; dga and lga through the boundary, lora (UNet "
                  "attention) and full (every UNet weight) on the client's white-box copy.",
              "step peak: the first step's peak tensor memory above the resident weights (activations; gradients "
              f"and AdamW state of what trains), {'each cell in a fresh process' if s['isolated'] else 'one process'}"
              "; total = one copy of the pipeline's weights + step peak; ratios are to full fine-tuning without "
              f"recomputation. time: median of {s['steps']} step(s) after the measured one and {s['warmup']} more."]
    return "\n".join(lines)


def _num(value: Any, digits: int, sep: str = "") -> str:
    """``value`` to ``digits`` places, or ``-`` where there is no number."""
    return f"{value:{sep}.{digits}f}" if isinstance(value, (int, float)) else "-"


def _main(argv: Sequence[str]) -> None:
    print(json.dumps(measure_cell(DiffusionCell(**json.loads(argv[0])))))


if __name__ == "__main__":
    _main(sys.argv[1:])
