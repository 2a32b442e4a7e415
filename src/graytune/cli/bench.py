"""``graytune bench``: boundary overhead and memory, measured side by side in one run (language models too:
``graytune.bench.lm``; ``--no-lm`` skips them).

With ``--arch`` it measures the CLIP-scale table instead (``graytune.bench.clip_scale``); with ``--diffusion-only`` the
diffusion training-step table alone (``graytune.bench.diffusion``: SD-1.5 scale, about 20 minutes on two CPU cores,
so the whole run adds it only with ``--diffusion``).
"""

from __future__ import annotations

import argparse
import json

from graytune.errors import InvalidInputError

CLIP_SCALE_FLAGS = ("batch", "dtype", "device", "methods", "recompute", "steps", "warmup", "interleaved_rounds")
DIFFUSION_FLAGS = ("diffusion_arch", "diffusion_batch", "diffusion_size", "diffusion_device", "diffusion_methods",
                   "diffusion_steps", "diffusion_out")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="boundary vs plain autograd, memory vs full fine-tuning, remote vs in-process, "
                                     "language models; --arch: every method at CLIP scale; --diffusion-only: a "
                                     "diffusion training step per method",
                       description="Measure, side by side in one process and interleaved: a training step through "
                                   "the boundary against the same computation by plain autograd, each method's peak "
                                   "step memory against full fine-tuning, TransMiter's transfer, graytune.memoize, "
                                   "the served boundary against in-process, and language models. With --arch, only "
                                   "the CLIP-scale table of every method on a random-weight CLIP architecture.")
    p.add_argument("--rounds", type=int, default=12, help="timed steps per path, interleaved (default: 12)")
    p.add_argument("--cases", default="minilm,efficientnet-lite0", help="comma-separated boundary cases")
    p.add_argument("--transmiter", action=argparse.BooleanOptionalAction, default=True,
                   help="also time TransMiter's transfer and adapted inference (default: on)")
    p.add_argument("--memo", action=argparse.BooleanOptionalAction, default=True,
                   help="epochs of an output adapter with and without graytune.memoize (default: on)")
    p.add_argument("--serve", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the served boundary: remote vs in-process, transport, mixed adapters "
                        "(default: on)")
    p.add_argument("--coalesce", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure graytune serve --coalesce-ms as a curve: 4 and 16 client processes x batch 1, "
                        "4 and 64, coalescing off and on side by side, with the crossover (default: on)")
    p.add_argument("--remote-latency", action=argparse.BooleanOptionalAction, default=True,
                   help="also time a training step over loopback against a simulated 50 ms link, synchronous and "
                        "pipelined (RemoteHandle.forward_backward) (default: on)")
    p.add_argument("--lm", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure language models: DGA's step through the boundary vs plain autograd on "
                        "SmolLM2-135M, and each LM method's memory vs full fine-tuning on SmolLM2-135M and "
                        "arch:llama-1b (about 20 GB for full fine-tuning at 1B; default: on)")
    _add_diffusion_flags(p)
    clip = p.add_argument_group("CLIP scale (with --arch, only this table runs)")
    clip.add_argument("--arch", action="append",
                      help="a random-weight CLIP architecture: clip-vit-b-16, clip-vit-l-14 or clip-tiny; repeat or "
                           "comma-separate for several")
    clip.add_argument("--batch", help="comma-separated batch sizes (default: 2 on CPU, 32,128 on CUDA)")
    clip.add_argument("--dtype", help="comma-separated backbone precisions: fp32, bf16, fp16 (default: fp32,bf16)")
    clip.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when present, else CPU)")
    clip.add_argument("--methods", help="comma-separated methods (default: zero-shot,output,dga,lga,adalink,lora,"
                                        "full); full fine-tuning and the native input-gradient step always run")
    clip.add_argument("--recompute", help="owner recomputation settings to measure: off, on or off,on "
                                          "(default: off,on)")
    clip.add_argument("--steps", type=int, help="timed steps per row, after the measured one (default: 3)")
    clip.add_argument("--warmup", type=int, help="untimed steps between the measured and the timed ones "
                                                 "(default: 1)")
    clip.add_argument("--interleaved-rounds", type=int,
                      help="rounds of native vs DGA vs DGA recomputed timed in one process, interleaved, for the "
                           "recomputation target's time ratio (default: 3; 0 skips)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(run=run)


def _add_diffusion_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("diffusion (one training step of dga, lga, lora and full UNet fine-tuning, "
                                 "recomputation off and on, as ratios to full fine-tuning)")
    group.add_argument("--diffusion", action=argparse.BooleanOptionalAction, default=False,
                       help="also measure the diffusion table in the whole run (default: off; at SD-1.5 scale it "
                            "takes about 20 minutes on two CPU cores)")
    group.add_argument("--diffusion-only", action="store_true", help="measure the diffusion table alone")
    group.add_argument("--diffusion-arch", help="the diffusion backbone: arch:sd15-random (default; Stable Diffusion "
                                                "1.5's shape, random weights, ~4.3 GB), arch:sd-tiny or "
                                                "hf-diffusion:<dir>")
    group.add_argument("--diffusion-batch", type=int, help="images per step (default: 8 on CUDA, 1 on CPU)")
    group.add_argument("--diffusion-size", type=int,
                       help="image side in pixels, a multiple of the VAE's factor (default: the backbone's, 512 for "
                            "SD 1.5: 64x64 latents)")
    group.add_argument("--diffusion-device", help="cpu, cuda or cuda:N (default: CUDA when present, else CPU)")
    group.add_argument("--diffusion-methods", help="comma-separated methods (default: dga,lga,lora,full); full "
                                                   "fine-tuning always runs")
    group.add_argument("--diffusion-steps", type=int, help="timed steps per cell after the measured one (default: 3 "
                                                           "on CUDA after 1 untimed, 1 on CPU)")
    group.add_argument("--diffusion-out", help="also write the results as JSON to this file")


def run(args: argparse.Namespace) -> int:
    _check_diffusion_flags(args)  # before any long work
    if args.diffusion_only:
        return run_diffusion(args)
    if args.arch:
        return run_clip_scale(args)
    given = [f"--{name.replace('_', '-')}" for name in CLIP_SCALE_FLAGS if getattr(args, name) is not None]
    if given:
        raise InvalidInputError(f"{', '.join(given)}: only for the CLIP-scale table; add --arch clip-vit-b-16 "
                                "(or clip-vit-l-14, clip-tiny) to run it")
    from graytune.bench.boundary import format_report, run_benchmarks

    results = run_benchmarks(args.cases.split(","), rounds=args.rounds)
    if args.transmiter:
        from graytune.bench import transmiter

        results["transmiter"] = transmiter.run()
    if args.memo:
        from graytune.bench import memo

        results["memo"] = memo.run()
    if args.serve:
        from graytune.bench import serve

        results["serve"] = serve.run(rounds=args.rounds)
    if args.coalesce:
        from graytune.bench import coalesce

        results["coalesce"] = coalesce.run()
    if args.remote_latency:
        from graytune.bench import remote_latency

        results["remote_latency"] = remote_latency.run()
    if args.lm:
        from graytune.bench import lm

        results["lm"] = lm.run(rounds=args.rounds)
    if args.diffusion:
        results["diffusion"] = _diffusion_results(args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_report(results))
        if args.transmiter:
            print("\n" + transmiter.format_report(results["transmiter"]))
        if args.memo:
            print("\n" + memo.format_report(results["memo"]))
        if args.serve:
            print("\n" + serve.format_report(results["serve"]))
        if args.coalesce:
            print("\n" + coalesce.format_report(results["coalesce"]))
        if args.remote_latency:
            print("\n" + remote_latency.format_report(results["remote_latency"]))
        if args.lm:
            print("\n" + lm.format_report(results["lm"]))
        if args.diffusion:
            from graytune.bench import diffusion

            print("\n" + diffusion.format_report(results["diffusion"]))
    return 0


def run_diffusion(args: argparse.Namespace) -> int:
    from graytune.bench import diffusion

    results = _diffusion_results(args)
    print(json.dumps(results, indent=2) if args.json else diffusion.format_report(results))
    return 0


def _check_diffusion_flags(args: argparse.Namespace) -> None:
    """``InvalidInputError`` for ``--diffusion-*`` flags without the diffusion table, or out of range."""
    stray = [f"--{name.replace('_', '-')}" for name in DIFFUSION_FLAGS if getattr(args, name) is not None]
    if stray and not (args.diffusion or args.diffusion_only):
        raise InvalidInputError(f"{', '.join(stray)}: only for the diffusion table; add --diffusion-only (or "
                                "--diffusion to the whole run)")
    given = (("--diffusion-batch", args.diffusion_batch, 1), ("--diffusion-size", args.diffusion_size, 1),
             ("--diffusion-steps", args.diffusion_steps, 0))
    for flag, value, least in given:
        if value is not None and value < least:
            raise InvalidInputError(f"{flag} {value}: give {least} or more")


def _diffusion_results(args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    """The diffusion table as the ``--diffusion-*`` flags ask (written to ``--diffusion-out`` too)."""
    from pathlib import Path

    from graytune.bench import diffusion

    methods = _names([args.diffusion_methods]) if args.diffusion_methods else diffusion.METHODS
    results = diffusion.run(args.diffusion_arch or diffusion.BACKBONE, batch=args.diffusion_batch,
                            size=args.diffusion_size, device=args.diffusion_device, methods=methods,
                            steps=args.diffusion_steps)
    if args.diffusion_out:
        Path(args.diffusion_out).write_text(json.dumps(results, indent=1) + "\n")
    return results


def run_clip_scale(args: argparse.Namespace) -> int:
    from graytune.bench import clip_scale
    from graytune.devices import parse_device

    device = parse_device(args.device)
    batches = _ints("--batch", args.batch or ("32,128" if device.type == "cuda" else "2"))
    recompute = {"off": [False], "on": [True], "off,on": [False, True], "on,off": [False, True]}.get(
        (args.recompute or "off,on").replace(" ", ""))
    if recompute is None:
        raise InvalidInputError(f"--recompute {args.recompute!r}: use off, on or off,on")
    for flag, value in (("--steps", args.steps), ("--warmup", args.warmup),
                        ("--interleaved-rounds", args.interleaved_rounds)):
        if value is not None and value < 0:
            raise InvalidInputError(f"{flag} {value}: give 0 or more")
    results = clip_scale.run(
        _names(args.arch), batches=batches, dtypes=_names([args.dtype or "fp32,bf16"]), device=str(device),
        methods=_names([args.methods]) if args.methods else clip_scale.METHODS, recompute=recompute,
        steps=3 if args.steps is None else args.steps, warmup=1 if args.warmup is None else args.warmup,
        interleaved_rounds=3 if args.interleaved_rounds is None else args.interleaved_rounds)
    print(json.dumps(results, indent=2) if args.json else clip_scale.format_report(results))
    return 0


def _names(values: list[str]) -> list[str]:
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _ints(flag: str, value: str) -> list[int]:
    try:
        numbers = [int(v) for v in _names([value])]
    except ValueError:
        raise InvalidInputError(f"{flag} {value!r}: give comma-separated whole numbers, e.g. 32,128") from None
    if not numbers or min(numbers) < 1:
        raise InvalidInputError(f"{flag} {value!r}: give batch sizes of 1 or more")
    return numbers
