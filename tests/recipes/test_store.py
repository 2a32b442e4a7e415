"""graytune.recipes.store: the studies' results file (atomic rewrite, two writers, one protocol, find)."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from graytune.errors import GraytuneError
from graytune.recipes.store import ProtocolMismatch, ResultsStore, protocol_differences

BLANK = {"protocol": {"steps": 10, "tasks": [("text", None)]}, "runs": []}


def row(seed: int, **extra: object) -> dict:
    return {"task": "text", "method": "dga", "lr": 1e-3, "seed": seed, **extra}


def test_every_add_rewrites_the_whole_file_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "deep" / "raw.json"
    store = ResultsStore(path, BLANK)
    assert not path.exists()  # nothing is written before the first row
    store.add(row(0))
    assert json.loads(path.read_text()) == {"protocol": {"steps": 10, "tasks": [["text", None]]}, "runs": [row(0)]}
    assert path.read_text() == json.dumps(store.data, indent=1)  # the layout the committed raw files have
    assert not path.with_suffix(".tmp").exists()

    before = path.read_text()

    def crash(self: Path, text: str) -> None:  # a write that dies half-way (disk full, killed)
        Path.write_bytes(self, text.encode()[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", crash)
    with pytest.raises(OSError, match="disk full"):
        store.add(row(1))
    monkeypatch.undo()
    assert path.read_text() == before  # the half-written text went to the temp file, never over the raw file
    with pytest.raises(TypeError):
        store.add(row(2, test=object()))  # not JSON: refused before anything is written
    assert path.read_text() == before


def test_two_stores_on_one_file_keep_each_others_rows(tmp_path: Path) -> None:
    path = tmp_path / "raw.json"
    first, second = ResultsStore(path, BLANK), ResultsStore(path, BLANK)  # both opened before either wrote
    first.add(row(0))
    second.add(row(1))
    first.add(row(2))
    assert [r["seed"] for r in json.loads(path.read_text())["runs"]] == [0, 1, 2]
    assert first.find(seed=1) == row(1)  # a write rereads the file, so each sees the other's rows after it


def _add_rows(path: str, seeds: list[int]) -> None:
    store = ResultsStore(path, BLANK)
    for seed in seeds:
        store.add(row(seed))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_two_processes_writing_at_once_lose_no_row(tmp_path: Path) -> None:
    path = tmp_path / "raw.json"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_add_rows, args=(str(path), list(range(start, 200, 2)))) for start in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert sorted(r["seed"] for r in json.loads(path.read_text())["runs"]) == list(range(200))


def test_a_file_of_another_protocol_is_refused_naming_what_differs(tmp_path: Path) -> None:
    path = tmp_path / "raw.json"
    ResultsStore(path, BLANK).add(row(0))
    ResultsStore(path, BLANK)  # the same protocol (tuples read back as lists) continues it
    other = {"protocol": {"steps": 20, "tasks": [("text", None)], "seeds": 3}, "runs": []}
    with pytest.raises(ProtocolMismatch, match=r"raw.json holds runs of another protocol "
                                               r"\(steps 10 there, 20 now, seeds absent there, 3 now\); pass"
                       ) as caught:
        ResultsStore(path, other, hint="pass the same flags")
    assert caught.value.differences == {"steps": (10, 20), "seeds": ("absent", 3)}
    assert isinstance(caught.value, GraytuneError)
    assert json.loads(path.read_text())["runs"] == [row(0)]  # refused before any write
    assert protocol_differences({"a": 1, "b": 2}, {"b": 2}) == {"a": (1, "absent")}


def test_find_matches_every_field_of_the_key_in_one_part(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "raw.json", {**BLANK, "audits": []})
    store.add(row(0, lr=None))
    store.add(row(0))
    store.add(row(1))
    store.add({"task": "text", "budget": 1000}, "audits")
    assert store.find(seed=0, lr=1e-3) == row(0)
    assert store.find(seed=0, lr=None) == row(0, lr=None)  # None is a value to match, not "any"
    assert store.find(seed=0)["lr"] is None  # the first match
    assert store.find(seed=2) is None and store.find(budget=1000) is None
    assert store.find("audits", budget=1000) == {"task": "text", "budget": 1000}


def test_an_existing_file_keeps_its_layout_and_gains_missing_parts(tmp_path: Path) -> None:
    """A raw file written before is continued as its study wrote it: its keys in their order, the header
    fields written over, a part it lacks appended."""
    path = tmp_path / "raw.json"
    old = {"ladder": [{"seed": 0}], "protocol": BLANK["protocol"], "threads": 1}
    path.write_text(json.dumps(old, indent=1))
    store = ResultsStore(path, {"ladder": [], "controls": [], "protocol": BLANK["protocol"]}, header={"threads": 2})
    store.header["sizes"] = {"test": 3}
    store.add({"seed": 1}, "controls")
    expected = {"ladder": [{"seed": 0}], "protocol": {"steps": 10, "tasks": [["text", None]]}, "threads": 2,
                "controls": [{"seed": 1}], "sizes": {"test": 3}}
    assert path.read_text() == json.dumps(expected, indent=1)


def test_update_makes_any_change_under_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "raw.json"
    store = ResultsStore(path, {"protocol": {}, "seeds": {}})
    other = ResultsStore(path, {"protocol": {}, "seeds": {}})
    store.update(lambda data: data["seeds"].setdefault("0", {}).update(tm={"hm": 0.5}))
    other.update(lambda data: data["seeds"].setdefault("0", {}).update(eft={"hm": 0.4}))
    assert json.loads(path.read_text())["seeds"] == {"0": {"tm": {"hm": 0.5}, "eft": {"hm": 0.4}}}
