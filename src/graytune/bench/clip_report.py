"""The CLIP-scale table from measured cells: the tables with their ratios, the issue's targets, the printed report.

``total_mb`` = the backbone's weights (one copy, in the run's dtype: resident for every method, and the
copy full fine-tuning trains) + the step's peak (activations; gradients and AdamW state of whatever
trains). Ratios are to full fine-tuning and to the native input-gradient step, both without recomputation.

Example:
    >>> from graytune.bench.clip_scale import run
    >>> print(format_report(run(["clip-tiny"], batches=[2], dtypes=["fp32"], methods=["dga"], device="cpu")))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from graytune.bench.clip_cells import LORA_OPTIONS, NATIVE, NO_BACKBONE_GRADIENT, Cell

DGA_MEMORY_TARGET, RECOMPUTE_MEMORY_TARGET, RECOMPUTE_TIME_TARGET = 0.40, 0.5, 1.35
BF16_SPEEDUP_TARGET, VJP_COSINE_TARGET = 1.8, 0.99


def build_tables(archs: Sequence[str], batches: Sequence[int], dtypes: Sequence[str], sizes: dict[str, Any],
                 measured: list[tuple[Cell, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One table per architecture, batch and dtype: its weights and its rows, each with its total and ratios."""
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
