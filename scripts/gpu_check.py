"""``make gpu-check``: everything graytune promises on a GPU, measured in one prepared command of at most 10 minutes.

Run as is on a machine with a CUDA device (``make gpu-check``); it writes ``docs/gpu-check.json``, which
``docs/benchmarks.md`` quotes with the machine named. Each part has its own time limit, and a part that fails or
runs out of time is recorded as such while the others still run:

1. ``make test-gpu``'s suite (``pytest -m gpu``): CUDA placement, half precision, recomputation;
2. the CLIP-scale bench at ViT-B/16, batch 32 and 128, fp32 and bf16, recomputation off and on, with the bf16
   speed-up and the bf16-vs-fp32 VJP cosine (``graytune bench --arch clip-vit-b-16``);
3. the coalescing curve (``graytune.bench.coalesce``) with the server's backbone on the GPU;
4. a CPU client training through a GPU server: three DGA steps over loopback, timed, against the same steps in
   process on the GPU;
5. the diffusion training step at Stable Diffusion 1.5's scale, batch 8 at 512 px (64 x 64 latents): dga, lga, lora
   and full UNet fine-tuning, recomputation off and on, peak GPU memory and time as ratios to full fine-tuning
   (``graytune.bench.diffusion`` on ``arch:sd15-random``, as ``graytune bench --diffusion-only`` runs it, its cells
   in one process here).

``--device cpu --quick`` runs the same parts small on a CPU (clip-tiny, a two-cell grid, arch:sd-tiny), to check the
command itself; its figures are not GPU figures and the file says so.

Run: .venv/bin/python scripts/gpu_check.py [--device cuda] [--out docs/gpu-check.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
#: seconds each part may take (under 10 minutes in all, with a margin for starting): the diffusion part builds SD
#: 1.5's 1.07 B random weights 8 times (~6 s each on two CPU cores), each before 4 steps on the GPU
LIMITS = {"test_gpu": 120, "clip_scale": 200, "coalesce": 90, "client_server": 45, "diffusion": 130}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (cpu only with --quick)")
    parser.add_argument("--out", default="docs/gpu-check.json")
    parser.add_argument("--quick", action="store_true", help="small parts, to check the command on any machine")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA device (torch {torch.__version__}); run "
                     "make gpu-check on a machine with a GPU, or --device cpu --quick to check the command here")
    if args.device == "cpu" and not args.quick:
        parser.error("--device cpu measures no GPU: add --quick to check the command, or run on a GPU")
    report: dict[str, Any] = {"machine": _machine(args.device), "quick": args.quick, "parts": {}}
    for name, part in (("test_gpu", _test_gpu), ("clip_scale", _clip_scale), ("coalesce", _coalesce),
                       ("client_server", _client_server), ("diffusion", _diffusion)):
        start = time.monotonic()
        try:
            result = part(args.device, args.quick, LIMITS[name])
            status = "ok"
        except subprocess.TimeoutExpired:
            result, status = {"error": f"ran past its {LIMITS[name]} s"}, "timed out"
        except Exception as err:  # noqa: BLE001 - recorded; the other parts still run
            result, status = {"error": f"{type(err).__name__}: {err}"}, "failed"
        report["parts"][name] = {"status": status, "seconds": round(time.monotonic() - start, 1), **result}
        print(f"gpu-check: {name}: {status} in {report['parts'][name]['seconds']} s", flush=True)
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"gpu-check: wrote {out}")
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1


def _machine(device: str) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {"gpu": gpu, "cuda": torch.version.cuda, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def _test_gpu(device: str, quick: bool, limit: int) -> dict[str, Any]:
    done = subprocess.run([PYTHON, "-m", "pytest", "-m", "gpu", "-rs", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                          capture_output=True, text=True, timeout=limit)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    if done.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest -m gpu exited {done.returncode}: {tail}")
    return {"summary": tail}


def _clip_scale(device: str, quick: bool, limit: int) -> dict[str, Any]:
    arch, batch = ("clip-tiny", "2") if quick else ("clip-vit-b-16", "32,128")
    command = [PYTHON, "-m", "graytune.cli.main", "bench", "--arch", arch, "--batch", batch, "--dtype", "fp32,bf16",
               "--recompute", "off,on", "--device", device, "--methods", "output,dga,lora", "--steps", "2",
               "--warmup", "1", "--interleaved-rounds", "2", "--json"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    if done.returncode != 0:
        raise RuntimeError(f"graytune bench exited {done.returncode}: {done.stderr[-500:]}")
    return {"command": " ".join(command[2:]), "results": json.loads(done.stdout)}


def _coalesce(device: str, quick: bool, limit: int) -> dict[str, Any]:
    from graytune.bench import coalesce

    grid = dict(clients=(4,), batches=(1,), steps=1, rounds=1) if quick else \
        dict(clients=(4, 16), batches=(1, 4, 64), steps=3, rounds=2)
    report = coalesce.run(device=device, **grid)  # type: ignore[arg-type]
    return {"report": report, "table": coalesce.format_report(report)}


def _client_server(device: str, quick: bool, limit: int) -> dict[str, Any]:
    """Three DGA steps by a CPU client through a server whose backbone is on ``device``, and in process there."""
    import graytune
    from graytune.model import AdaptedModel
    from graytune.serve import ApiKeys, ServeConfig, create_app
    from graytune.serve.runner import BackgroundServer

    key = "gpu-check-key-0123456789"
    local = graytune.open_backbone("minilm", "dark-gray", device=device)
    texts = [f"a short text number {i} about a cat or a car" for i in range(8 if quick else 32)]
    with BackgroundServer(create_app(local, ServeConfig(access="dark-gray"), ApiKeys({"check": key}))) as url:
        remote = graytune.open_backbone(url, "dark-gray", api_key=key)
        times = {"remote_cpu_client_s": _steps(AdaptedModel.build(remote, "dga"), texts),
                 "in_process_s": _steps(AdaptedModel.build(local, "dga").to(torch.device(device)), texts)}
    return {"batch": len(texts), **times, "remote_over_in_process": times["remote_cpu_client_s"] / times["in_process_s"]}


def _diffusion(device: str, quick: bool, limit: int) -> dict[str, Any]:
    """One training step per method at SD 1.5's scale, batch 8 at 512 px (quick: the tiny pipeline, batch 2 at
    16 px). The cells run one after another in one process (each builds its own backbone and frees it; CUDA's peak
    is reset before each step), so no cell pays for starting Python again; that process has ``limit`` seconds."""
    arch, batch, size = ("arch:sd-tiny", 2, 16) if quick else ("arch:sd15-random", 8, 512)
    code = ("import json, sys; from graytune.bench import diffusion; "
            f"r = diffusion.run({arch!r}, batch={batch}, size={size}, device={device!r}, steps=2, warmup=1, "
            "isolate=False, progress=False); print(json.dumps(r)); print(diffusion.format_report(r), file=sys.stderr)")
    done = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=limit)
    if done.returncode != 0:
        raise RuntimeError(f"the diffusion bench exited {done.returncode}: {done.stderr[-500:]}")
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return {"call": f"graytune.bench.diffusion.run({arch!r}, batch={batch}, size={size}, steps=2, warmup=1, "
                    "isolate=False)", "results": results}


def _steps(model: Any, texts: list[str], steps: int = 3) -> float:
    """The median seconds of a DGA step (text embeddings, a loss, backward, an optimizer step)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = model.encode_text(texts).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


if __name__ == "__main__":
    sys.exit(main())
