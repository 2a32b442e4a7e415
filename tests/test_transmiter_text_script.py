"""scripts/transmiter_text.py's raw file (atomic, resumable, one protocol) and scripts/transmiter_text_table.py's
rendering and verdict, on made-up rows: no backbone, seconds. The end-to-end check is ``--smoke`` (MPNet needed)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from tests.scripts import load_script

script = load_script("transmiter_text")
renderer = load_script("transmiter_text_table")


def head(protocol=None) -> dict:  # type: ignore[no-untyped-def]
    return {"protocol": asdict(protocol or script.Protocol()), "weak": "minilm", "strong": "hf-text:/m",
            "data": "wordnet-supersense:base-to-novel", "strong_sha256": "78c0197b" * 8, "torch_threads": 1}


def test_store_writes_every_row_at_once_and_resumes_one_protocol_only(tmp_path: Path) -> None:
    path = tmp_path / "raw.json"
    store = script.Store(path, head())
    store.put(0, "weak_zs", {"harmonic_mean": 0.5})
    assert json.loads(path.read_text())["seeds"]["0"]["weak_zs"] == {"harmonic_mean": 0.5}
    assert not path.with_suffix(".tmp").exists()
    again = script.Store(path, head())  # a rerun keeps what is there
    assert again.has(0, "weak_zs") and not again.has(0, "weak_zs", "tm") and not again.has(1, "weak_zs")
    with pytest.raises(SystemExit, match="another protocol.*plus_steps 300 there, 50 now"):
        script.Store(path, head(replace(script.Protocol(), plus_steps=50)))

    with pytest.raises(SystemExit, match="holds rows on wordnet-supersense:base-to-novel, not fortunes.*--data "
                       "wordnet-supersense"):
        script.Store(path, {**head(), "data": "fortunes:base-to-novel"})  # one file holds one data set's rows


def test_an_unknown_data_set_is_refused_before_any_work(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        script.main(["--data", "fashion-mnist"])
    err = capsys.readouterr().err
    assert "--data 'fashion-mnist'" in err and "wordnet-supersense, fortunes" in err


def made_up(hm: dict[str, list[float]]) -> dict:
    """A raw file whose rows have the given HM per seed (base = novel = HM)."""
    seeds: dict[str, dict] = {}
    for key, per_seed in hm.items():
        for seed, value in enumerate(per_seed):
            seeds.setdefault(str(seed), {})[key] = {"base_accuracy": value, "novel_accuracy": value,
                                                    "harmonic_mean": value, "accuracy": value}
    return {**head(), "sizes": {"pool_base": 992, "pool_all": 2000, "test": 3000}, "seeds": seeds}


@pytest.mark.parametrize("tm, verdict", [([0.80, 0.81, 0.82], "holds"),  # between: holds
                                          ([0.70, 0.71, 0.72], "does not hold"),  # below weak fine-tuned
                                          ([0.90, 0.90, 0.90], "does not hold")])  # far above the upper bound
def test_the_verdict_follows_the_numbers(tm: list[float], verdict: str) -> None:
    raw = made_up({"strong_zs": [0.74, 0.74, 0.74], "weak_ft": [0.78, 0.79, 0.77], "tm": tm,
                   "strong_ft": [0.83, 0.84, 0.82]})
    text = "\n".join(renderer.hypothesis(raw))
    assert "HM: max(74.0, 78.0) = 78.0" in text and text.count(f"the pattern **{verdict}**") == 3


def test_the_verdict_is_per_metric() -> None:
    """TransMiter may win on base and lose on novel; each metric gets its own verdict."""
    raw = made_up({"strong_zs": [0.80] * 3, "weak_ft": [0.75] * 3, "tm": [0.85] * 3, "strong_ft": [0.90] * 3})
    for row in raw["seeds"].values():
        row["tm"]["novel_accuracy"] = 0.50
    text = "\n".join(renderer.hypothesis(raw))
    assert "base: max(80.0, 75.0) = 80.0 ≤ TransMiter 85.0 ≲ strong fine-tuned 90.0: the pattern **holds**" in text
    assert "novel: max(80.0, 75.0) = 80.0 > TransMiter 50.0" in text and "novel" in text.split("does not hold")[0]


def test_render_writes_the_table_and_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = made_up({key: [0.7, 0.72] for key in script.ROWS})
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    renderer.main(["--raw", str(tmp_path / "raw.json"), "--figures", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| **TransMiter on MPNet** (base-only pool, N = 992, β = 500) | 71.0 ± 1.4 |" in out
    assert "ablation: β = 0.625·N, transfer on N = 248" in out
    assert out.count("\n| ") == len(script.ROWS) + 1  # a line per row, and the header
    assert (tmp_path / "transmiter-text.png").stat().st_size > 10_000


def test_another_text_set_is_named_in_the_table_and_its_own_figure(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    raw = made_up({key: [0.7, 0.72] for key in script.ROWS})
    raw["data"], raw["sizes"]["classes"] = "fortunes:base-to-novel", 8
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    renderer.main(["--raw", str(tmp_path / "raw.json"), "--figures", str(tmp_path)])
    out = capsys.readouterr().out
    assert "3000 test quotes" in out and "| all 8 classes % |" in out and "(M = 8)" in out and "glosses" not in out
    assert (tmp_path / "transmiter-text-fortunes.png").is_file() and not (tmp_path / "transmiter-text.png").exists()


class CountingEncoder:
    """A stand-in text tower: one 2-d embedding per text (its length, 1), counting the texts it embeds."""

    def __init__(self) -> None:
        self.spec, self.embedded = type("Spec", (), {"fingerprint": "f" * 64})(), 0

    def encode_text(self, texts: list[str]):  # type: ignore[no-untyped-def]
        import torch

        self.embedded += len(texts)
        return torch.tensor([[float(len(t)), 1.0] for t in texts])


def test_a_bulk_pass_is_on_disk_before_the_seed_ends(tmp_path: Path) -> None:
    texts = [f"text {i}" for i in range(300)]
    first = CountingEncoder()
    embedder = script.CachedText(first, tmp_path, "weak", batch_size=64)
    for start in range(0, 300, 128):  # as class_scores asks: 128 at a time
        embedder.encode_text(texts[start:start + 128])  # no save() called: interrupted
    again = CountingEncoder()
    cached = script.CachedText(again, tmp_path, "weak")
    assert cached.saved == 256  # on disk at 256 new texts; the last 44 were still in memory when it stopped
    assert cached.encode_text(texts[:3]).tolist() == [[6.0, 1.0], [6.0, 1.0], [6.0, 1.0]]
    assert (first.embedded, again.embedded) == (300, 0)
    cached.encode_text(texts[256:] + ["a new one"])  # fewer than 256 new: embedded, kept in memory until save()
    assert again.embedded == 45 and script.CachedText(CountingEncoder(), tmp_path, "weak").saved == 256
    cached.save()
    assert script.CachedText(CountingEncoder(), tmp_path, "weak").saved == 301
