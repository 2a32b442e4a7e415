"""Reading history.jsonl (resumed runs, unknown events, damage) and drawing curves that follow it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graytune import ArtifactError, InvalidInputError, UnknownNameError
from graytune.eval.plots import DPI, FIGURE_SIZE, plot_histories, read_history

C0 = np.array([0x1F, 0x77, 0xB4])  # matplotlib's first line colour: run 1


def write_history(folder: Path, loss=lambda s: 2.0 * math.exp(-s / 15), recall=lambda s: 0.2 + s / 200,
                  steps: int = 40, every: int = 10, extra: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(1, steps + 1):
        lines.append({"event": "step", "step": s, "epoch": 0, "loss": loss(s), "lr": 1e-3, "step_seconds": 0.4,
                      "samples_per_s": 80.0, "forward_queries": s, "gradient_queries": s, "time_s": s * 0.4})
        if s % every == 0:
            lines.append({"event": "val", "step": s, "metrics": {"mean_recall": recall(s), "median_rank": 9.0},
                          "primary": "mean_recall", "best": s == steps - every})
    lines += extra or []
    (folder / "history.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def run_colour_mask(image: np.ndarray, colour: np.ndarray = C0) -> np.ndarray:
    return np.abs(image - colour).sum(axis=-1) < 40


def test_history_keeps_the_last_line_per_step_and_ignores_other_events(tmp_path) -> None:
    run = write_history(tmp_path / "run", steps=20, extra=[
        {"event": "checkpoint", "step": 20, "path": "x"},           # unknown event: ignored
        {"event": "step", "step": 15, "loss": 99.0},                # resumed: step 15 again, the last one wins
        {"event": "val", "step": 20, "metrics": {"mean_recall": 0.9}, "primary": "mean_recall", "best": True},
    ])
    history = read_history(run)
    assert history.name == "run" and history.steps == list(range(1, 21))
    assert history.loss[14] == 99.0 and history.loss[13] == pytest.approx(2.0 * math.exp(-14 / 15))
    assert history.val_steps == [10, 20] and history.metric("mean_recall")[1] == [0.25, 0.9]
    assert history.primary == "mean_recall" and history.best_step == 20
    assert read_history(run / "history.jsonl").steps == history.steps  # the file itself works too


def test_damaged_or_missing_or_empty_histories_are_refused_with_what_to_do(tmp_path) -> None:
    (tmp_path / "bare").mkdir()
    with pytest.raises(ArtifactError, match=r"has no history\.jsonl; graytune train --out DIR writes it"):
        read_history(tmp_path / "bare")
    with pytest.raises(ArtifactError, match="does not exist"):
        read_history(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "history.jsonl").write_text(json.dumps({"event": "start", "step": 0}) + "\n\n")
    with pytest.raises(ArtifactError, match="holds no step or validation line"):
        read_history(empty)
    bad = write_history(tmp_path / "bad", steps=3)
    (bad / "history.jsonl").write_text("{oops\n" + (bad / "history.jsonl").read_text())
    with pytest.raises(ArtifactError, match="line 1: not JSON"):
        read_history(bad)
    cut = write_history(tmp_path / "cut", steps=3)
    with open(cut / "history.jsonl", "a") as f:
        f.write('{"event": "step", "st')  # killed mid-write: the unfinished last line is skipped
    assert read_history(cut).steps == [1, 2, 3]


def test_the_image_has_its_size_and_curves_that_follow_the_history(tmp_path) -> None:
    falling = plot_histories([read_history(write_history(tmp_path / "a"))], tmp_path / "falling.png")
    rising = plot_histories([read_history(write_history(tmp_path / "b", loss=lambda s: 0.1 + s / 20))],
                            tmp_path / "rising.png")
    width, height = (round(x * DPI) for x in FIGURE_SIZE)
    for path in (falling, rising):
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (width, height)
    a, b = pixels(falling), pixels(rising)
    assert (a != b).any(axis=-1).sum() > 500  # other values, another picture

    def loss_curve_rows(image: np.ndarray) -> tuple[float, float]:
        """Median height of run 1's pixels in the first and last third of the loss panel's columns."""
        panel = run_colour_mask(image[:, : image.shape[1] // 2])
        cols = np.nonzero(panel.any(axis=0))[0]
        assert len(cols) > 200, "the loss curve is missing: too few columns hold the run's colour"
        third = (cols.max() - cols.min()) // 3
        top = [np.nonzero(panel[:, c])[0].min() for c in cols]
        first = [t for c, t in zip(cols, top) if c < cols.min() + third]
        last = [t for c, t in zip(cols, top) if c > cols.max() - third]
        return float(np.median(first)), float(np.median(last))

    start, end = loss_curve_rows(a)
    assert start < end - 100  # falling loss: the curve starts high (small row index) and ends low
    start, end = loss_curve_rows(b)
    assert start > end + 100  # rising loss: the other way round
    val_panel = run_colour_mask(a[:, a.shape[1] // 2:])
    assert val_panel.sum() > 300  # the validation curve is drawn too


def test_several_runs_get_their_own_colours_and_the_method_in_the_title(tmp_path) -> None:
    one = write_history(tmp_path / "x" / "run")
    two = write_history(tmp_path / "y" / "run", loss=lambda s: 1.0 + 0.0 * s)
    (one / "adapter_config.json").write_text(json.dumps({"method": "dga", "backbone": "minilm"}))
    runs = [read_history(one), read_history(two)]
    assert runs[0].method == "dga" and runs[0].backbone == "minilm" and runs[1].method is None
    image = pixels(plot_histories(runs, tmp_path / "two.png"))
    assert run_colour_mask(image).sum() > 300
    assert run_colour_mask(image, np.array([0xFF, 0x7F, 0x0E])).sum() > 300  # run 2 in matplotlib's C1


def test_plot_refuses_what_it_cannot_draw_or_should_not_replace(tmp_path) -> None:
    runs = [read_history(write_history(tmp_path / "r"))]
    out = plot_histories(runs, tmp_path / "p.png")
    before = out.read_bytes()
    with pytest.raises(InvalidInputError, match="exists; choose another --out or pass --overwrite"):
        plot_histories(runs, out)
    assert out.read_bytes() == before
    plot_histories(runs, out, metric="median_rank", overwrite=True)
    assert out.read_bytes() != before
    with pytest.raises(UnknownNameError, match="did you mean 'mean_recall'"):
        plot_histories(runs, tmp_path / "q.png", metric="mean_recal")
    with pytest.raises(InvalidInputError, match="must end in one of .png"):
        plot_histories(runs, tmp_path / "q.jpeg")
    with pytest.raises(InvalidInputError, match="no runs"):
        plot_histories([], tmp_path / "q.png")


def test_a_run_without_validation_still_plots_its_loss(tmp_path) -> None:
    run = write_history(tmp_path / "r", every=10**6)
    history = read_history(run)
    assert history.val_steps == [] and history.primary is None and history.best_step is None
    image = pixels(plot_histories([history], tmp_path / "p.png"))
    assert run_colour_mask(image[:, : image.shape[1] // 2]).sum() > 300


def test_step_ticks_are_whole_numbers_and_labels_stay_inside_the_frame(tmp_path) -> None:
    """A short run drew ticks at 2.5, 7.5; the 'best' label of a point at the top right was cut by the frame."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from graytune.eval.plots import _draw

    top_right = {"event": "val", "step": 4, "metrics": {"mean_recall": 0.4}, "primary": "mean_recall", "best": True}
    run = read_history(write_history(tmp_path / "short", steps=4, every=1, recall=lambda s: 0.1 * s,
                                     extra=[top_right]))
    assert run.best_step == 4  # the last and highest point is the one kept
    figure = _draw([run], "mean_recall")
    FigureCanvasAgg(figure).draw()
    loss_ax, val_ax = figure.axes
    for ax in (loss_ax, val_ax):
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    frame = val_ax.get_window_extent()
    labels = [t for t in val_ax.texts if t.get_text().startswith("best")]
    assert len(labels) == 1
    box = labels[0].get_window_extent()
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
