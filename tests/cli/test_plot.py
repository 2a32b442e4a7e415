"""graytune plot: writes a PNG of the runs' curves, refuses to overwrite, says what is missing."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from graytune.cli.main import main
from tests.eval.test_plots import run_colour_mask, write_history


def test_plot_writes_a_png_of_the_runs_with_plot_png_as_default(tmp_path, monkeypatch, capsys) -> None:
    dga = write_history(tmp_path / "dga")
    lga = write_history(tmp_path / "lga", loss=lambda s: 1.5 - s / 50, recall=lambda s: 0.5)
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(dga), str(lga), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # stdout holds the JSON alone
    assert result["out"] == "plot.png" and [r["best_step"] for r in result["runs"]] == [30, 30]
    assert result["runs"][0]["steps"] == 40 and result["runs"][0]["validations"] == 4
    with Image.open(tmp_path / "plot.png") as im:
        assert im.format == "PNG" and im.size == (1100, 420)
        image = np.asarray(im.convert("RGB")).astype(int)
    assert run_colour_mask(image).sum() > 300  # a curve in run 1's colour, not a blank canvas

    assert main(["plot", str(dga)]) == 2  # plot.png exists now
    assert "plot.png exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    assert main(["plot", str(dga), "--overwrite", "--metric", "median_rank"]) == 0
    assert capsys.readouterr().out.startswith("wrote plot.png\n")


def test_plot_names_what_is_missing(tmp_path, capsys) -> None:
    (tmp_path / "old").mkdir()
    assert main(["plot", str(tmp_path / "old"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "graytune plot: error:" in err and "has no history.jsonl" in err and "graytune train --out" in err
    assert main(["plot", str(write_history(tmp_path / "r")), "--metric", "accuracy",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "unknown validation metric 'accuracy'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_a_run_without_the_plotted_metric_is_named_not_silently_dropped(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json as json_

    retrieval = write_history(tmp_path / "dga")
    lora = write_history(tmp_path / "lora")
    lines = [json_.loads(x) for x in (lora / "history.jsonl").read_text().splitlines()]
    for line in lines:  # a classification run: accuracy, no mean_recall
        if line["event"] == "val":
            line.update(metrics={"accuracy": 0.5}, primary="accuracy")
    (lora / "history.jsonl").write_text("".join(json_.dumps(x) + "\n" for x in lines))
    assert main(["plot", str(retrieval), str(lora), "--out", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert f"note: {lora} has no mean_recall" in out and "not drawn" in out
    assert main(["plot", str(retrieval), str(lora), "--out", str(tmp_path / "q.png"), "--json"]) == 0
    assert json_.loads(capsys.readouterr().out)["not_drawn"] == [str(lora)]
