"""graytune demo ends by saying whether its table matches README.md's (the columns that do not depend on the
machine), naming each cell that differs; README's table is in the demo's own format."""

from __future__ import annotations

from pathlib import Path

from graytune.cli import demo
from graytune.cli.main import main

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _rows_of(lines: list[str]) -> list[dict]:
    """Result rows that print as ``lines`` (step s and peak MB as given)."""
    rows = []
    for line in lines[2:]:
        method, access, i2t, t2i, mean, params, step, peak = line.split()
        rows.append({"method": method, "access": access, "trainable_parameters": int(params.replace(",", "")),
                     "step_seconds": float(step), "peak_mb": float(peak),
                     "test": {"text_retrieval_recall@1": float(i2t) / 100,
                              "image_retrieval_recall@1": float(t2i) / 100, "mean_recall": float(mean) / 100}})
    return rows


def test_readmes_table_is_the_demos_format_and_rows() -> None:
    table = demo.readme_table(README)
    assert table is not None and [line.split()[0] for line in table[2:]] == list(demo.METHODS)
    assert demo.table_lines(_rows_of(table)) == table  # printed as the demo prints it, to the character


def test_the_comparison_names_each_cell_that_differs() -> None:
    table = demo.readme_table(README)
    rows = _rows_of(table)
    assert demo.compare_with_readme(demo.table_lines(rows), README).startswith("README.md's table matches")
    for row in rows:
        row["step_seconds"] += 1.0  # the machine's: not compared
        row["peak_mb"] += 10
    assert "matches" in demo.compare_with_readme(demo.table_lines(rows), README)
    dga = next(r for r in rows if r["method"] == "dga")
    was = f"{100 * dga['test']['mean_recall']:.1f}"
    dga["test"]["mean_recall"] += 0.003
    message = demo.compare_with_readme(demo.table_lines(rows), README)
    now = f"{100 * dga['test']['mean_recall']:.1f}"
    assert message.startswith("README.md's table differs in 1 cell: ")
    assert f"dga mean R {now} here, {was} in README.md" in message
    assert "not found" in demo.compare_with_readme(demo.table_lines(rows), "# a README without the section")


def test_the_demo_prints_the_comparison_at_its_end(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import graytune.recipes.compare as compare

    rows = _rows_of(demo.readme_table(README))
    monkeypatch.setattr(compare, "compare", lambda *args, **kwargs: rows)
    assert main(["demo"]) == 0
    assert capsys.readouterr().out.rstrip().split("\n")[-1].startswith("README.md's table matches")
    assert main(["demo", "--steps", "3"]) == 0
    assert "not the README's settings" in capsys.readouterr().out.rstrip().split("\n")[-1]

