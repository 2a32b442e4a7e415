"""The diffusion training-step benchmark's machinery on ``arch:sd-tiny`` (what it computes and reports; no timing
asserted), and ``arch:sd15-random``'s shapes read from modules built on the meta device (no weights).

The SD-1.5-scale figures come from ``graytune bench --diffusion-only`` (``make bench``).
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from graytune.backbones.diffusion_arch import sd15_random
from graytune.bench import diffusion
from graytune.bench.diffusion_steps import METHODS, NOISE, DiffusionCell, build_step
from graytune.cli.main import main
from graytune.errors import InvalidInputError
from graytune.types import PortKind


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny ops on 2 threads of a busy 2-core machine wait on each other; 1 thread does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def results() -> dict:  # type: ignore[type-arg]
    return diffusion.run("arch:sd-tiny", batch=2, size=16, device="cpu", isolate=False, progress=False)


def test_every_cell_is_measured_and_full_is_the_reference(results: dict) -> None:  # type: ignore[type-arg]
    rows = {(r["method"], r["recompute"]): r for r in results["rows"]}
    assert list(rows) == [(m, on) for m in METHODS for on in (False, True)]
    for key, row in rows.items():
        assert "error" not in row, key
        assert row["step_peak_mb"] > 0 and row["total_mb"] > row["step_peak_mb"], key
        assert row["time_s"] > 0 and row["vs_full"] > 0 and row["time_vs_full"] > 0, key
        assert row["latents"] == [2, 4, 8, 8], key  # 16 px through the tiny VAE's factor 2
    assert rows["full", False]["vs_full"] == rows["full", False]["step_vs_full"] == 1.0
    assert rows["full", False]["time_vs_full"] == 1.0
    trained = [rows[m, False]["trainable"] for m in ("dga", "lga", "lora", "full")]
    assert 0 < trained[0] < trained[1] < trained[2] < trained[3] == results["unet_params"]
    for method in ("dga", "lga"):  # activations only: checkpointing the blocks keeps less
        assert rows[method, True]["step_peak_mb"] < rows[method, False]["step_peak_mb"], method
    assert results["weights_mb"] == rows["full", False]["weights_mb"]


def test_the_report_is_a_markdown_table(results: dict) -> None:  # type: ignore[type-arg]
    text = diffusion.format_report(results)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 2 * len(METHODS)  # the header and a row per cell
    assert "| full | off | 16,928 |" in text and "| 1.000 | 1.000 |" in text
    assert "batch 2, latents 4x8x8" in text and results["machine"]["torch"] in text
    json.dumps(results)  # --diffusion-out writes it


def test_a_gray_box_step_moves_only_its_adapters() -> None:
    step, info = build_step(DiffusionCell("arch:sd-tiny", "dga", False, batch=1, size=8, device="cpu"))
    assert info["latents"] == [1, 4, 4, 4] and "weights_mb" not in info  # dark-gray: no module to weigh
    held = [c.cell_contents for c in step.__closure__ or ()]  # the step closes over its model, batch and optimizer
    optimizer = next(h for h in held if isinstance(h, torch.optim.Optimizer))
    before = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
    step()
    after = [p for group in optimizer.param_groups for p in group["params"]]
    assert sum(p.numel() for p in after) == info["trainable"] == 2 * 8  # DGA's shift and one extra token, width 8
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_a_fresh_process_prints_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    cell = DiffusionCell("arch:sd-tiny", "lora", True, batch=1, size=8, device="cpu")
    diffusion._main([json.dumps(asdict(cell))])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["trainable"] > 0 and row["step_peak_mb"] > 0 and row["time_s"] > 0 and row["unet_params"] > 0


def test_bad_settings_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InvalidInputError, match="zeroth-order"):
        diffusion.plan_cells("arch:sd-tiny", 1, None, "cpu", ["dga-zo"], [False], 1, 0)
    with pytest.raises(InvalidInputError, match="multiple of 2"):
        build_step(DiffusionCell("arch:sd-tiny", "dga", False, batch=1, size=15, device="cpu"))
    assert main(["bench", "--diffusion-batch", "4"]) == 2
    assert "--diffusion-only" in capsys.readouterr().err
    assert main(["bench", "--diffusion-only", "--diffusion-steps", "-1"]) == 2


def test_the_command_writes_its_json(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """``--diffusion-only`` passes its flags on, prints the table and writes ``--diffusion-out`` (cells in this
    process here, to stay fast)."""
    real = diffusion.run
    monkeypatch.setattr(diffusion, "run", lambda *a, **k: real(*a, **k, isolate=False, progress=False))
    out = tmp_path / "raw.json"
    assert main(["bench", "--diffusion-only", "--diffusion-arch", "arch:sd-tiny", "--diffusion-size", "8",
                 "--diffusion-methods", "full", "--diffusion-device", "cpu", "--diffusion-out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert [(r["method"], r["recompute"]) for r in saved["rows"]] == [("full", False), ("full", True)]
    assert saved["settings"]["batch"] == 1 and saved["latents"] == [1, 4, 4, 4]  # CPU's default batch
    assert "| full | on |" in capsys.readouterr().out


def test_sd15_random_has_stable_diffusion_1_5s_shapes_without_weights() -> None:
    backbone = sd15_random("meta")  # modules without storage: configs and shapes only
    model = backbone.model
    assert all(p.is_meta for p in model.parameters())
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in model.named_children()}
    assert counts == {"text_encoder": 123_060_480, "unet": 859_520_964, "vae": 83_653_863}  # SD 1.5's
    unet = model.unet.config
    assert tuple(unet.block_out_channels) == (320, 640, 1280, 1280) and unet.cross_attention_dim == 768
    assert unet.sample_size == 64 and unet.in_channels == unet.out_channels == 4 and unet.layers_per_block == 2
    spec = backbone.spec
    assert spec.id == "arch:sd15-random" and backbone.tokenizer is None
    assert spec.port("text.token_embeds").shape == ("B", "L", 768)
    assert spec.port_names(PortKind.ENTRY) == [*(f"text.layer.{k}" for k in range(1, 12)),
                                               *(f"text.prompts.{k}" for k in range(1, 12))]
    assert spec.port("unet.prediction").shape == ("B", 4, "h", "w") == spec.port("latents.noisy").shape
    assert spec.port("image.latents").shape == ("B", 4, "H/8", "W/8")
    text, image, latents = (spec.preprocess[k] for k in ("text", "image", "latents"))
    assert (text["max_tokens"], text["vocab_size"], text["tokenizer"]) == (77, 49408, "none (send ids)")
    assert (image["image_size"], image["vae_scale_factor"], image["scaling_factor"]) == (512, 8, 0.18215)
    scheduler = latents["scheduler"]
    assert scheduler["class"] == "PNDMScheduler" and latents["prediction_type"] == "epsilon"
    assert (scheduler["config"]["beta_start"], scheduler["config"]["beta_end"]) == (0.00085, 0.012)
    assert scheduler["config"]["beta_schedule"] == "scaled_linear" and latents["num_train_timesteps"] == 1000
