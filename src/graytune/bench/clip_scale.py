"""Memory and time of one training step per method on CLIP-size backbones (``graytune bench --arch``).

Memory and time do not depend on the weights' values, so the random-weight ``arch:clip-vit-b-16`` and
``arch:clip-vit-l-14`` backbones give the real figures. For each architecture, batch, backbone dtype
and owner recomputation setting, each method runs the same workload in a fresh process:

- **workload**: B random images at the architecture's size (224 px) and B texts in CLIP's 77 token
  positions (right-padded, real lengths spread from 8 to 60 tokens), fixed seeds; symmetric InfoNCE
  between the adapted model's image and text embeddings (``AdaptedModel.forward``); one AdamW step
  at the method's default learning rate. ``zero-shot`` runs the forward alone under ``torch.no_grad()``.
- **native**: the input-gradient floor: DGA's adapters trained by plain autograd through the
  white-box module (weights frozen, gradients reach the pixels and token embeddings, no boundary
  node), never recomputed.
- **memory**: the first step's peak (its optimizer state is created then). On CPU, the torch
  profiler's allocation events (``eval.profiling.peak_tensor_mb``); on CUDA,
  ``torch.cuda.max_memory_allocated`` less what was allocated before the step (the raw figure,
  weights included, is kept as ``allocated_peak_mb``). ``total_mb`` = the backbone's weights (one
  copy, in the run's dtype: resident for every method, and the copy full fine-tuning trains) + the
  step's peak (activations; gradients and AdamW state of whatever trains).
- **time**: the median of ``steps`` steps after the measured one and ``warmup`` more.

Example:
    >>> results = run(["clip-tiny"], batches=[2], dtypes=["fp32"], methods=["dga"], device="cpu")
    >>> print(format_report(results))

The work is split by job: the cells and their steps in ``clip_cells``, measuring one in a fresh process
in ``clip_measure``, the tables, targets and printed report in ``clip_report``; this module runs a whole
table and keeps every name it had.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from graytune.bench.clip_cells import (
    CONTEXT,
    LORA_OPTIONS,
    METHODS,
    NATIVE,
    NO_BACKBONE_GRADIENT,
    Cell,
    build_step,
    check_methods,
    clip_batch,
    plan_cells,
)
from graytune.bench.clip_measure import (
    MEASUREMENTS,
    _main,
    interleaved_times,
    machine,
    measure,
    measure_cell,
    vjp_cosine,
    weights,
)
from graytune.bench.clip_report import (
    BF16_SPEEDUP_TARGET,
    DGA_MEMORY_TARGET,
    RECOMPUTE_MEMORY_TARGET,
    RECOMPUTE_TIME_TARGET,
    VJP_COSINE_TARGET,
    build_tables,
    format_report,
    targets,
)
from graytune.devices import dtype_name, parse_device, parse_dtype

__all__ = [
    "BF16_SPEEDUP_TARGET", "CONTEXT", "DGA_MEMORY_TARGET", "LORA_OPTIONS", "MEASUREMENTS", "METHODS", "NATIVE",
    "NO_BACKBONE_GRADIENT", "RECOMPUTE_MEMORY_TARGET", "RECOMPUTE_TIME_TARGET", "VJP_COSINE_TARGET", "Cell",
    "build_step", "check_methods", "clip_batch", "format_report", "interleaved_times", "machine",
    "measure_cell", "plan_cells", "run", "targets", "vjp_cosine", "weights",
]

log = logging.getLogger(__name__)


def run(archs: Sequence[str], batches: Sequence[int] = (4,), dtypes: Sequence[str] = ("fp32", "bf16"),
        device: str | None = None, methods: Sequence[str] = METHODS, recompute: Sequence[bool] = (False, True),
        steps: int = 3, warmup: int = 1, interleaved_rounds: int = 3, cosine: bool = True,
        progress: bool = True, isolate: bool = True) -> dict[str, Any]:
    """Every cell of the CLIP-scale table, each in a fresh process, with ratios and targets; plain data for JSON.

    Args:
        archs: ``clip-vit-b-16``, ``clip-vit-l-14``, ``clip-tiny`` (the ``arch:`` backbones).
        batches: batch sizes (images and texts per step).
        dtypes: backbone precisions (``fp32``, ``bf16``, ``fp16``).
        device: ``cpu``, ``cuda``, ``cuda:N``; default CUDA when present.
        methods: registered methods; ``full`` and the native input-gradient step are always added.
        recompute: owner recomputation settings to measure.
        steps, warmup: timed steps (their median is reported) and untimed ones after the measured step.
        interleaved_rounds: rounds of native vs DGA vs DGA recomputed, interleaved in one process, per
            architecture, batch and dtype (0: none); the recomputation target's time ratio is read from them.
        cosine: also measure the bf16-vs-fp32 VJP cosine per architecture (when bf16 is among ``dtypes``).
        progress: show a progress bar on stderr.
        isolate: each measurement in a fresh process (off: in this one, for tests; CUDA peaks then
            include what earlier cells left cached).
    """
    from tqdm.auto import tqdm

    where = parse_device(device)
    dtypes = [dtype_name(parse_dtype(d)) for d in dtypes]
    check_methods(methods)
    info = machine(where)
    sizes = {arch: weights(arch) for arch in archs}  # also refuses an unknown architecture before any long work
    cells = plan_cells(archs, batches, dtypes, methods, recompute, str(where), steps, warmup)
    measured = []
    for cell in tqdm(cells, desc="clip-scale cells", unit="cell", disable=not progress):
        row = measure("cell", asdict(cell), isolate)
        log.info("%s: %s", cell, row)
        measured.append((cell, row))
    tables = build_tables(archs, batches, dtypes, sizes, measured)
    if interleaved_rounds > 0 and True in recompute and "dga" in methods:
        for t in tqdm(tables, desc="interleaved native/dga/recomputed", unit="table", disable=not progress):
            t["interleaved"] = measure("interleaved", {"arch": t["arch"], "batch": t["batch"], "dtype": t["dtype"],
                                                        "device": str(where), "rounds": interleaved_rounds}, isolate)
            log.info("interleaved %s batch %d %s: %s", t["arch"], t["batch"], t["dtype"], t["interleaved"])
    results: dict[str, Any] = {
        "machine": {**info, "load_avg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "settings": {"batches": list(batches), "dtypes": dtypes, "methods": list(methods), "steps": steps,
                     "warmup": warmup, "interleaved_rounds": interleaved_rounds, "isolated": isolate,
                     "recompute": [bool(r) for r in recompute],
                     "workload": "B images + B texts in 77 positions, symmetric InfoNCE, one AdamW step",
                     "lora": LORA_OPTIONS},
        "tables": tables,
        "vjp_cosine": {},
    }
    if cosine and "bf16" in dtypes:
        for arch in archs:
            results["vjp_cosine"][arch] = measure(
                "cosine", {"arch": arch, "batch": min(batches), "device": str(where)}, isolate)
    results["targets"] = targets(results)
    return results


if __name__ == "__main__":  # the old entry point of one measurement; ``clip_measure`` is the one used
    _main(sys.argv[1:])
