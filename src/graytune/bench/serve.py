"""The served boundary, measured side by side in one run.

- step time of one adapter step through a loopback server vs in process (MiniLM, batch 32 x 64 tokens),
  interleaved round by round;
- transport of one 19 MB tensor (a batch of 32 images at 224 px): encode, decode, and a loopback round trip;
- throughput of hosted adapters when requests name four different adapters vs all the same one.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from fastapi import Request, Response

from graytune.access import open_backbone
from graytune.access.wire import decode, encode
from graytune.artifacts import save_adapter
from graytune.model import AdaptedModel
from graytune.serve import ApiKeys, ServeConfig, create_app
from graytune.serve.adapters import AdapterHost
from graytune.serve.runner import BackgroundServer

KEY = "bench-key-0123456789abcdef"


def run(rounds: int = 10) -> dict[str, Any]:
    local = open_backbone("minilm", "dark-gray")
    app = create_app(local, ServeConfig(access="dark-gray"), ApiKeys({"bench": KEY}), extra=_echo)  # type: ignore[arg-type]
    with BackgroundServer(app) as url:
        remote = open_backbone(url, "dark-gray", api_key=KEY)
        steps = _step_times(local, remote, rounds)
        transport = _transport(url, rounds)
    return {"remote_step": steps, "transport": transport, "mixed_adapters": _mixed_adapters(local, rounds)}


def _step_times(local: Any, remote: Any, rounds: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (32, 64), generator=g)
    inputs = {"text.input_ids": ids, "text.attention_mask": torch.ones_like(ids)}

    def step(handle: Any) -> float:
        shift = torch.zeros(1, 1, 384, requires_grad=True)
        start = time.perf_counter()
        z = handle.forward(inputs, add={"text.token_embeds": shift}, outputs=["text.embeds"])["text.embeds"]
        z.square().sum().backward()
        return time.perf_counter() - start

    step(local), step(remote)
    times: dict[str, list[float]] = {"in_process": [], "remote": []}
    for r in range(rounds):
        order = ("in_process", "remote") if r % 2 == 0 else ("remote", "in_process")
        for name in order:
            times[name].append(step(local if name == "in_process" else remote))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": [32, 64], "in_process_s": med["in_process"], "remote_s": med["remote"],
            "ratio": med["remote"] / med["in_process"], "all_s": times}


def _echo(app: Any, service: Any) -> None:
    @app.post("/bench/echo")
    async def echo(request: Request) -> Response:
        service.client(request)
        tensors, _ = decode(await service.body(request))
        return Response(encode(tensors))


def _transport(url: str, rounds: int) -> dict[str, Any]:
    import httpx

    tensor = torch.randn(32, 3, 224, 224)  # 19.3 MB
    mb = tensor.numel() * 4 / 1e6
    enc, dec, trip = [], [], []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        for _ in range(rounds):
            t0 = time.perf_counter()
            body = encode({"x": tensor})
            t1 = time.perf_counter()
            decode(body)
            t2 = time.perf_counter()
            back = decode(client.post("/bench/echo", content=body).content)[0]["x"]
            t3 = time.perf_counter()
            if not torch.equal(back, tensor):
                raise RuntimeError("the echo changed the tensor")
            enc.append(t1 - t0)
            dec.append(t2 - t1)
            trip.append(t3 - t2)
    med = statistics.median
    return {"megabytes": mb, "encode_ms": 1000 * med(enc), "decode_ms": 1000 * med(dec),
            "round_trip_ms": 1000 * med(trip), "round_trip_mb_per_s": 2 * mb / med(trip)}


def _mixed_adapters(handle: Any, rounds: int, requests: int = 32, texts_per_request: int = 8) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for i in range(4):
            model = AdaptedModel.build(handle, "dga")
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
            folders[f"a{i}"] = str(save_adapter(model, Path(tmp) / f"a{i}"))
        host = AdapterHost(handle, folders, window_ms=20, max_batch=requests * texts_per_request)
    texts = [f"a photo of item number {i} on a shelf" for i in range(texts_per_request)]

    def burst(names: list[str]) -> float:
        start = time.perf_counter()
        futures = [host.submit(name, "text", texts=texts) for name in names]
        for f in futures:
            f.result(timeout=300)
        return requests * texts_per_request / (time.perf_counter() - start)

    single, mixed = ["a0"] * requests, [f"a{i % 4}" for i in range(requests)]
    burst(single), burst(mixed)
    rates: dict[str, list[float]] = {"single": [], "mixed": []}
    calls_before = host.backbone_calls
    for r in range(max(3, rounds // 2)):
        for name in (("single", "mixed") if r % 2 == 0 else ("mixed", "single")):
            rates[name].append(burst(single if name == "single" else mixed))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"requests": requests, "texts_per_request": texts_per_request, "single_samples_per_s": med["single"],
            "mixed_samples_per_s": med["mixed"], "ratio": med["mixed"] / med["single"],
            "backbone_calls_per_burst": (host.backbone_calls - calls_before) / (2 * len(rates["single"]))}


def format_report(r: dict[str, Any]) -> str:
    s, t, m = r["remote_step"], r["transport"], r["mixed_adapters"]
    return "\n".join([
        "served boundary (loopback, MiniLM)",
        f"  step time, batch 32 x 64 tokens: in-process {s['in_process_s']:.3f} s, remote {s['remote_s']:.3f} s, "
        f"ratio {s['ratio']:.3f} (target <= 1.3)",
        f"  transport of one {t['megabytes']:.1f} MB tensor: encode {t['encode_ms']:.1f} ms, decode "
        f"{t['decode_ms']:.1f} ms, round trip {t['round_trip_ms']:.1f} ms ({t['round_trip_mb_per_s']:.0f} MB/s)",
        f"  hosted adapters, {m['requests']} requests x {m['texts_per_request']} texts: single adapter "
        f"{m['single_samples_per_s']:.0f} samples/s, four mixed {m['mixed_samples_per_s']:.0f} samples/s, "
        f"ratio {m['ratio']:.3f} (target >= 0.9), {m['backbone_calls_per_burst']:.1f} backbone calls per burst",
    ])
