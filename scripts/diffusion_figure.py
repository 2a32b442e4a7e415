"""The text-to-image figure (issue 31): generations of the tiny random diffusion pipeline before and after training
an adapter on real images, Tux Paint's drawings. MECHANICS ONLY: ``arch:sd-tiny`` has random weights (no real
diffusion weights exist on these machines), so the figure shows that training through the boundary moves what the
owner's sampler draws, never that it draws well.

Run: .venv/bin/python scripts/diffusion_figure.py [--steps 300] [--out docs/figures/diffusion-tiny-tuxpaint.png]
writes the figure and docs/diffusion-figure-raw.json (per method: trainable parameters, access, the held-out
denoising loss before and after, the mean absolute change of its images' pixels from zero-shot's, seconds).

Protocol: the built-in ``tuxpaint`` set (its drawings with their captions; train split), 32 px (half the tiny pipeline's
own size), each method at its own level with the registry's learning rate, ``--steps`` AdamW steps of batch 8,
validated every 100 steps on the held-out denoising loss, best state kept. Each row draws the same four test
captions from the same seeds (25 DDIM steps, guidance 7.5).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

METHODS = ("zero-shot", "dga", "lga", "lora", "full")
BACKBONE, SIZE, PROMPTS = "arch:sd-tiny", 32, 4
SETTINGS = {"num_inference_steps": 25, "guidance_scale": 7.5, "seed": 0, "height": SIZE, "width": SIZE}
LABEL = "arch:sd-tiny, random weights: MECHANICS ONLY (no real diffusion weights here), not image quality"


def train(method: str, steps: int, folder: Path) -> tuple[str | None, dict[str, Any]]:
    """Train ``method`` on Tux Paint into ``folder``; the artifact (None for zero-shot) and its row."""
    from graytune.recipes.run import RunSpec, train_model
    from graytune.train.config import TrainConfig

    started = time.perf_counter()
    out = None if method == "zero-shot" else str(folder / method)
    summary, _ = train_model(RunSpec(BACKBONE, None, method, "tuxpaint", out=out, image_size=SIZE,
                                     train=TrainConfig(max_steps=steps, batch_size=8, eval_every=100)),
                             progress=False)
    first = summary["history"][0]["val_denoise_mse"] if summary["history"] else None
    return out, {"method": method, "access": summary["access"], "trainable": summary["trainable_parameters"],
                 "lr": summary["lr"], "steps": summary["steps"], "val_denoise_mse_first": first,
                 "test_denoise_mse": summary["test"]["denoise_mse"],
                 "seconds": round(time.perf_counter() - started, 1)}


def draw(adapter: str | None, prompts: list[str]) -> torch.Tensor:
    from graytune.recipes.generate import open_generator

    return open_generator(BACKBONE, adapter).generate_images(prompts, SETTINGS)


def figure(rows: list[tuple[str, torch.Tensor]], prompts: list[str], out: Path) -> None:
    """One row per method (its label on the left), one column per prompt (captions on top), the note below."""
    from PIL import Image, ImageDraw, ImageFont

    cell, label_w, head, foot = 128, 250, 40, 24
    sheet = Image.new("RGB", (label_w + cell * len(prompts), head + cell * len(rows) + foot), "white")
    pen, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for j, prompt in enumerate(prompts):
        pen.text((label_w + j * cell + 2, 4), prompt[:22], fill="black", font=font)
        pen.text((label_w + j * cell + 2, 18), prompt[22:44], fill="black", font=font)
    for i, (label, images) in enumerate(rows):
        top = head + i * cell
        for k, line in enumerate(label.split("\n")):
            pen.text((4, top + 8 + 14 * k), line, fill="black", font=font)
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        for j, image in enumerate(pixels):
            tile = Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB").resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (label_w + j * cell, top))
    pen.text((4, head + cell * len(rows) + 6), LABEL, fill="darkred", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="docs/figures/diffusion-tiny-tuxpaint.png")
    parser.add_argument("--raw", default="docs/diffusion-figure-raw.json")
    args = parser.parse_args(argv)
    from graytune.data.catalog import load_splits

    test = load_splits("tuxpaint").test
    prompts = [test.captions[i] for i in range(PROMPTS)]
    rows, table = [], []
    with tempfile.TemporaryDirectory() as folder:
        for method in METHODS:
            adapter, row = train(method, args.steps, Path(folder))
            table.append(row)
            print(json.dumps(row), file=sys.stderr)
            images = draw(adapter, prompts)
            row["mean_abs_pixel_change"] = float((images - rows[0][1]).abs().mean()) if rows else 0.0
            label = (f"{method} ({row['access']})\n{row['trainable']:,} trained\n"
                     f"held-out MSE {row['test_denoise_mse']:.4f}\n"
                     f"mean |pixel change| {row['mean_abs_pixel_change']:.4f}")
            rows.append((label, images))
    figure(rows, prompts, Path(args.out))
    raw = {"backbone": BACKBONE, "data": "tuxpaint (train split)", "image_size": SIZE, "steps": args.steps,
           "batch_size": 8, "sampling": SETTINGS, "prompts": prompts, "note": LABEL, "rows": table}
    Path(args.raw).write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out} and {args.raw}")


if __name__ == "__main__":
    main()
