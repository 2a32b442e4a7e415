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
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from graytune.access import Handle, open_backbone
from graytune.devices import dtype_name, parse_device, parse_dtype
from graytune.errors import InvalidInputError
from graytune.methods import methods_shown_in
from graytune.eval.profiling import peak_tensor_mb
from graytune.methods import MethodKind, get_method
from graytune.model import AdaptedModel
from graytune.types import AccessLevel

log = logging.getLogger(__name__)
Tensor = torch.Tensor

METHODS = tuple(methods_shown_in("bench"))
"""The methods measured by default; ``full`` always runs (the ratios' reference)."""
NATIVE = "native"
"""DGA's adapters by plain autograd through the white-box module: the input-gradient floor."""
NO_BACKBONE_GRADIENT = ("zero-shot", "output")
"""No gradient crosses the backbone, so owner recomputation changes nothing: measured with it off only."""
LORA_OPTIONS = {"rank": 16, "targets": "q_proj,v_proj"}
CONTEXT = 77  # CLIP's text positions
DGA_MEMORY_TARGET, RECOMPUTE_MEMORY_TARGET, RECOMPUTE_TIME_TARGET = 0.40, 0.5, 1.35
BF16_SPEEDUP_TARGET, VJP_COSINE_TARGET = 1.8, 0.99


@dataclass(frozen=True)
class Cell:
    """One measurement: a method's step on one architecture, batch, dtype and recomputation setting."""

    arch: str
    method: str
    dtype: str
    recompute: bool
    batch: int
    device: str
    steps: int = 3
    warmup: int = 1


def clip_batch(handle: Handle, batch: int, seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """``[B, 3, S, S]`` pixels and ``[B, 77]`` right-padded token ids with their mask, on the handle's device.

    Ids follow CLIP's vocabulary: start and end tokens are its last two ids (49406, 49407), padding is
    the end token, the real tokens between are drawn at random.
    """
    size = int(handle.spec.port("image.pixels").shape[-1])
    vocab = int(handle.spec.preprocess["text"]["vocab_size"])
    start, end = vocab - 2, vocab - 1
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, size, size, generator=g)  # [B, 3, S, S]
    lengths = torch.linspace(8, 60, batch).round().long() if batch > 1 else torch.tensor([34])  # real tokens
    ids = torch.full((batch, CONTEXT), end, dtype=torch.long)  # [B, 77]
    mask = torch.zeros(batch, CONTEXT, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        ids[row, 0] = start
        ids[row, 1:n - 1] = torch.randint(0, start, (n - 2,), generator=g)
        mask[row, :n] = 1
    where = handle.device
    return pixels.to(where), {"text.input_ids": ids.to(where), "text.attention_mask": mask.to(where)}


def build_step(cell: Cell) -> tuple[Callable[[], None], int]:
    """The step ``cell`` measures (a closure over its model, batch and optimizer) and its trainable count."""
    name = "dga" if cell.method == NATIVE else cell.method
    method = get_method(name)
    white = cell.method == NATIVE or method.kind is MethodKind.WHITEBOX
    handle = open_backbone(f"arch:{cell.arch}", AccessLevel.WHITE_BOX if white else method.min_access,
                           reads=method.reads, device=cell.device, dtype=cell.dtype,
                           recompute=cell.recompute and cell.method != NATIVE)
    model = AdaptedModel.build(handle, name, LORA_OPTIONS if name == "lora" else None)
    pixels, tokens = clip_batch(handle, cell.batch)
    del handle  # white-box methods run on the model's own copy; the owner's placed copy can go
    labels = torch.arange(cell.batch, device=model.device)

    def loss() -> Tensor:
        out = model(images=pixels, texts=tokens)
        return (F.cross_entropy(out.logits_per_image, labels) + F.cross_entropy(out.logits_per_text, labels)) / 2

    if cell.method == "zero-shot":
        def forward() -> None:
            with torch.no_grad():
                loss()

        return forward, 0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=method.lr or 1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    return step, sum(p.numel() for p in params)


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


def _measure(kind: str, payload: dict[str, Any], isolate: bool) -> dict[str, Any]:
    """One measurement, in a fresh process unless ``isolate`` is off; ``{"error": ...}`` when it failed."""
    if isolate:
        return _in_fresh_process(kind, payload)
    try:
        return MEASUREMENTS[kind](payload)
    except Exception as err:  # noqa: BLE001  (a failed cell is reported in its row, as in a fresh process)
        log.warning("%s %s failed", kind, payload, exc_info=True)
        return {"error": f"{type(err).__name__}: {err}"}


def _in_fresh_process(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """``python -m graytune.bench.clip_scale KIND PAYLOAD``'s JSON line, or ``{"error": ...}`` when it failed."""
    proc = subprocess.run([sys.executable, "-m", "graytune.bench.clip_scale", kind, json.dumps(payload)],
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


def plan_cells(archs: Sequence[str], batches: Sequence[int], dtypes: Sequence[str], methods: Sequence[str],
               recompute: Sequence[bool], device: str, steps: int, warmup: int) -> list[Cell]:
    """Every cell to measure.

    ``full`` and ``native`` always run without recomputation (the ratios' references); ``full`` with it
    too only when asked for among ``methods``. Recomputation only where a gradient crosses the backbone.
    """
    wanted = list(dict.fromkeys([*methods, "full", NATIVE]))
    cells = []
    for arch in archs:
        for batch in batches:
            for dtype in dtypes:
                for method in wanted:
                    settings = [False] if method in (*NO_BACKBONE_GRADIENT, NATIVE) else recompute
                    if method == "full":  # the reference, off always; on as well when asked for
                        settings = [False, *([True] if True in recompute and "full" in methods else [])]
                    cells += [Cell(arch, method, dtype, on, batch, device, steps, warmup) for on in settings]
    return cells


def check_methods(methods: Sequence[str]) -> None:
    """``InvalidInputError`` for a method whose training is not one AdamW step on a backward pass."""
    for name in methods:
        if name == NATIVE:
            continue
        method = get_method(name)
        why = ("adapts logits without a gradient through the backbone" if method.kind is MethodKind.LOGIT else
               "trains from forward calls alone (zeroth-order)" if getattr(method, "zeroth_order", False) else "")
        if why:
            raise InvalidInputError(f"method {name!r} {why}, not by one AdamW step on a backward pass; the "
                                    f"CLIP-scale table measures {', '.join(METHODS)} and others trained that way")


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
        row = _measure("cell", asdict(cell), isolate)
        log.info("%s: %s", cell, row)
        measured.append((cell, row))
    tables = _tables(archs, batches, dtypes, sizes, measured)
    if interleaved_rounds > 0 and True in recompute and "dga" in methods:
        for t in tqdm(tables, desc="interleaved native/dga/recomputed", unit="table", disable=not progress):
            t["interleaved"] = _measure("interleaved", {"arch": t["arch"], "batch": t["batch"], "dtype": t["dtype"],
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
            results["vjp_cosine"][arch] = _measure(
                "cosine", {"arch": arch, "batch": min(batches), "device": str(where)}, isolate)
    results["targets"] = targets(results)
    return results


def _tables(archs: Sequence[str], batches: Sequence[int], dtypes: Sequence[str], sizes: dict[str, Any],
            measured: list[tuple[Cell, dict[str, Any]]]) -> list[dict[str, Any]]:
    tables = []
    for arch in archs:
        for batch in batches:
            for dtype in dtypes:
                w = sizes[arch]["mb"][dtype]
                rows = [{"method": c.method, "recompute": c.recompute, **r,
                         **({"total_mb": w + r["step_peak_mb"]} if "step_peak_mb" in r else {})}
                        for c, r in measured if (c.arch, c.batch, c.dtype) == (arch, batch, dtype)]
                _add_ratios(rows)
                tables.append({"arch": arch, "batch": batch, "dtype": dtype, "params": sizes[arch]["params"],
                               "image_size": sizes[arch]["image_size"], "weights_mb": w, "rows": rows})
    return tables


def _find(rows: list[dict[str, Any]], method: str, recompute: bool = False) -> dict[str, Any] | None:
    return next((r for r in rows if r["method"] == method and r["recompute"] == recompute and "error" not in r), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row against full fine-tuning and the native step, both without recomputation."""
    full, native = _find(rows, "full"), _find(rows, NATIVE)
    for r in rows:
        if "error" in r:
            continue
        for ref_name, ref in (("full", full), ("native", native)):
            r[f"memory_vs_{ref_name}"] = _ratio(r["total_mb"], ref and ref["total_mb"])
            r[f"time_vs_{ref_name}"] = _ratio(r["time_s"], ref and ref["time_s"])
        r["step_peak_vs_native"] = _ratio(r["step_peak_mb"], native and native["step_peak_mb"])


def _status(ok: bool | None, gpu_only: bool = False, on_gpu: bool = False) -> str:
    if gpu_only and not on_gpu:
        return "GPU"
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its figures, per architecture, batch and dtype."""
    on_gpu = results["machine"]["device"].startswith("cuda")
    out = []
    for t in results["tables"]:
        where = f"{t['arch']}, batch {t['batch']}, {t['dtype']}"
        dga, dga_rc, native = _find(t["rows"], "dga"), _find(t["rows"], "dga", True), _find(t["rows"], NATIVE)
        if dga and dga.get("memory_vs_full") is not None:
            ratio = dga["memory_vs_full"]
            out.append({"target": f"DGA memory <= {DGA_MEMORY_TARGET:.2f}x full fine-tuning", "where": where,
                        "value": ratio, "status": _status(ratio <= DGA_MEMORY_TARGET)
                        if t["arch"] == "clip-vit-b-16" else "info",
                        "detail": f"{ratio:.3f}x (weights + step peak: {dga['total_mb']:.0f} vs "
                                  f"{dga['total_mb'] / ratio:.0f} MB)"})
        if dga_rc and native and dga_rc.get("step_peak_vs_native") is not None:
            mem, total, tm = dga_rc["step_peak_vs_native"], dga_rc["memory_vs_native"], dga_rc["time_vs_native"]
            timing = "separate processes"
            if "dga_recompute_vs_native" in t.get("interleaved", {}):
                tm, timing = t["interleaved"]["dga_recompute_vs_native"], "interleaved"
            met = None if tm is None else mem <= RECOMPUTE_MEMORY_TARGET and tm <= RECOMPUTE_TIME_TARGET
            out.append({"target": f"owner recomputation <= {RECOMPUTE_MEMORY_TARGET}x native memory at "
                                  f"<= {RECOMPUTE_TIME_TARGET}x its time", "where": where,
                        "value": {"step_peak": mem, "total": total, "time": tm},
                        "status": _status(met),
                        "detail": f"DGA recomputed: step peak {mem:.3f}x native (with weights {total:.3f}x), "
                                  + ("time not measured" if tm is None else f"time {tm:.3f}x ({timing})")})
    for fp32 in (t for t in results["tables"] if t["dtype"] == "fp32"):
        bf16 = next((t for t in results["tables"] if (t["arch"], t["batch"], t["dtype"]) ==
                     (fp32["arch"], fp32["batch"], "bf16")), None)
        a, b = _find(fp32["rows"], "dga"), bf16 and _find(bf16["rows"], "dga")
        if a and b and a["time_s"] and b["time_s"]:
            speedup = a["time_s"] / b["time_s"]
            out.append({"target": f"bf16 step >= {BF16_SPEEDUP_TARGET}x faster than fp32 (GPU)",
                        "where": f"{fp32['arch']}, batch {fp32['batch']}", "value": speedup,
                        "status": _status(speedup >= BF16_SPEEDUP_TARGET, gpu_only=True, on_gpu=on_gpu),
                        "detail": f"DGA step {a['time_s']:.3f} s fp32 / {b['time_s']:.3f} s bf16 = {speedup:.2f}x"
                                  + ("" if on_gpu else " on CPU: the target is for GPUs")})
    for arch, cos in results.get("vjp_cosine", {}).items():
        if "error" in cos:
            out.append({"target": f"bf16 VJP cosine >= {VJP_COSINE_TARGET} vs fp32", "where": arch, "value": None,
                        "status": "n/a", "detail": f"failed: {cos['error']}"})
            continue
        low = min(cos["image.pixels"], cos["text.token_embeds"])
        out.append({"target": f"bf16 VJP cosine >= {VJP_COSINE_TARGET} vs fp32", "where": arch, "value": low,
                    "status": _status(low >= VJP_COSINE_TARGET),
                    "detail": f"pixels {cos['image.pixels']:.4f}, token embeddings {cos['text.token_embeds']:.4f} "
                              f"(embeddings {cos['image.embeds']:.4f} / {cos['text.embeds']:.4f})"})
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _interleaved_line(ab: dict[str, Any]) -> str:
    if "error" in ab:
        return f"interleaved: failed: {ab['error'][:100]}"
    sec = ab["seconds"]
    return (f"interleaved in one process, median of {ab['rounds']} rounds: native {sec['native']:.3f} s, "
            f"dga {sec['dga']:.3f} s ({ab['dga_vs_native']:.3f}x), "
            f"dga recomputed {sec['dga_recompute']:.3f} s ({ab['dga_recompute_vs_native']:.3f}x)")


def format_report(results: dict[str, Any]) -> str:
    """The table ``graytune bench --arch`` prints: one block per architecture, batch and dtype, then the targets."""
    m, s = results["machine"], results["settings"]
    where = (f"{m['gpu']} ({m['gpu_memory_gb']:.0f} GiB), CUDA {m['cuda']}" if "gpu" in m
             else f"CPU {m['cpu']}, {m['cores']} cores, {m['threads']} threads")
    load = "" if not m.get("load_avg") else \
        f"; 1-min load average {m['load_avg'][0]:.1f} at the start, {m['load_avg_end'][0]:.1f} at the end"
    lines = [f"{where}; torch {m['torch']}, python {m['python']}; measured {m['date']}{load}",
             f"workload: {s['workload']}; memory = first step, "
             + (f"time = median of {s['steps']} timed step(s) after it and {s['warmup']} more" if s["steps"] else
                "time not measured (--steps 0)"), ""]
    head = (f"{'method':<10}{'recompute':>10}{'trainable':>12}{'step peak MB':>14}{'total MB':>10}"
            f"{'/full':>7}{'/native':>8}{'peak/nat':>9}{'step s':>9}{'/full':>7}{'/native':>8}")
    for t in results["tables"]:
        lines += [f"{t['arch']}  batch {t['batch']} ({t['image_size']} px)  {t['dtype']}: weights "
                  f"{t['weights_mb']:.0f} MB ({t['params'] / 1e6:.1f} M params), counted in every total", head]
        for r in t["rows"]:
            rc = "-" if r["method"] in (*NO_BACKBONE_GRADIENT, NATIVE) else ("on" if r["recompute"] else "off")
            if "error" in r:
                lines.append(f"{r['method']:<10}{rc:>10}  failed: {r['error'][:90]}")
                continue
            lines.append(f"{r['method']:<10}{rc:>10}{r['trainable']:>12,}{r['step_peak_mb']:>14.0f}"
                         f"{r['total_mb']:>10.0f}{_fmt(r['memory_vs_full'], '.3f'):>7}"
                         f"{_fmt(r['memory_vs_native'], '.3f'):>8}{_fmt(r['step_peak_vs_native'], '.3f'):>9}"
                         f"{_fmt(r['time_s'], '.3f'):>9}{_fmt(r['time_vs_full'], '.3f'):>7}"
                         f"{_fmt(r['time_vs_native'], '.3f'):>8}")
        lines += [_interleaved_line(t.get("interleaved")), ""] if "interleaved" in t else [""]
    lines.append("targets")
    lines += [f"  [{t['status']:>4}] {t['target']} ({t['where']}): {t['detail']}" for t in results["targets"]]
    apart = "each row in a fresh process" if s.get("isolated", True) else "all rows in one process"
    memory = ("torch.cuda.max_memory_allocated less what was allocated before it (the raw peak, weights included, "
              "is in --json as allocated_peak_mb)" if "gpu" in m else "the torch profiler's allocation events")
    lines += ["",
              "step peak: the most tensor memory the first AdamW step adds (activations; gradients and AdamW state of",
              f"what trains), from {memory}; {apart}. total = weights + step peak.",
              "/full, /native: ratios to full fine-tuning and to the native input-gradient step (DGA's adapters by",
              "plain autograd through the white-box module), both without recomputation, same architecture, batch",
              "and dtype; peak/nat compares step peaks alone. recompute '-': no gradient crosses the backbone",
              "(zero-shot, output), or the reference itself (native). zero-shot: the forward alone, no optimizer.",
              "interleaved: native, dga and dga recomputed timed round by round in one process, so that other load",
              "hits them alike; the recomputation target's time ratio is read from it.",
              f"lora: r = {LORA_OPTIONS['rank']} on {LORA_OPTIONS['targets']}. With recompute on, lora and full "
              "recompute their layers too.",
              "Half precision casts the frozen weights; full fine-tuning and LoRA then train in that dtype (AdamW",
              "state too)."]
    return "\n".join(lines)


MEASUREMENTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "cell": lambda p: measure_cell(Cell(**p)),
    "cosine": lambda p: vjp_cosine(**p),
    "interleaved": lambda p: interleaved_times(**p),
}
"""What ``python -m graytune.bench.clip_scale KIND PAYLOAD`` measures, by KIND."""


def _main(argv: Sequence[str]) -> None:
    kind, payload = argv[0], json.loads(argv[1])
    if kind not in MEASUREMENTS:
        raise SystemExit(f"unknown measurement {kind!r}; use one of {', '.join(MEASUREMENTS)}")
    print(json.dumps(MEASUREMENTS[kind](payload)))


if __name__ == "__main__":
    _main(sys.argv[1:])
