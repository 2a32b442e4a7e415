"""One results file for the studies: a JSON document rewritten atomically after every finished run.

A study (``scripts/converged.py``, ``scripts/exposure.py``, ``scripts/transmiter_text.py``) writes each
run as soon as it finishes, so an interrupted study resumes where it stopped and a rerun does only what is
missing. Every write rereads the file under a lock (``flock`` on ``<name>.lock`` beside it) and makes its
change to what it finds, so processes running parts of one study side by side keep each other's rows;
the new text goes to ``<name>.tmp`` first and replaces the file in one rename, so a reader never sees half
of it. The document's ``protocol`` is what every run in it shares: a file written with another one is
refused, naming the fields that differ.

Example:
    >>> store = ResultsStore("docs/converged-raw.json", {"protocol": {"steps": 500}, "runs": []})
    >>> if store.find(task="text", method="dga", lr=1e-3, seed=0) is None:
    ...     store.add({"task": "text", "method": "dga", "lr": 1e-3, "seed": 0, "test": {"accuracy": 0.8}})
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from graytune.errors import GraytuneError

Document = dict[str, Any]
_ABSENT = "absent"


class ProtocolMismatch(GraytuneError):
    """A results file written with another protocol than the one asked for.

    Attributes:
        path: the file.
        differences: per differing field, ``(value in the file, value asked for)``; a field one side lacks
            reads ``"absent"`` there.
    """

    def __init__(self, path: Path, differences: dict[str, tuple[Any, Any]], hint: str) -> None:
        self.path, self.differences = path, differences
        fields = ", ".join(f"{k} {there} there, {now} now" for k, (there, now) in differences.items())
        super().__init__(f"{path} holds runs of another protocol ({fields}); {hint}")


def protocol_differences(there: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The fields whose values differ between two protocols (``now``'s order first), as ``(there, now)``.

    >>> protocol_differences({"steps": 10, "seed": 0}, {"steps": 20, "seed": 0})
    {'steps': (10, 20)}
    """
    keys = [*now, *(k for k in there if k not in now)]
    return {k: (there.get(k, _ABSENT), now.get(k, _ABSENT)) for k in keys
            if there.get(k, _ABSENT) != now.get(k, _ABSENT)}


class ResultsStore:
    """A study's raw JSON file: read at opening, reread and rewritten under a lock at every write.

    Args:
        path: the JSON file; it and its folder are created at the first write.
        blank: the document a new file starts as: ``protocol`` (what every run shares) and an empty
            container for each kind of row, e.g. ``{"protocol": {...}, "runs": []}``. A key an existing file
            lacks is added from here (a part a later version of the study writes); the file's keys keep
            their order.
        header: fields written over the file's at every write: facts of the writing process (thread count,
            a model's path) that are not part of the protocol. ``header`` stays a dict to add to.
        hint: what the refusal of another protocol tells the user to do.

    Raises:
        ProtocolMismatch: the file holds runs of another protocol.
    """

    def __init__(self, path: str | Path, blank: Mapping[str, Any], header: Mapping[str, Any] | None = None,
                 hint: str = "open it with the same protocol to continue it, or write to another file") -> None:
        self.path = Path(path)
        self.blank: Document = json.loads(json.dumps(blank))  # a copy, tuples as the file holds them: lists
        self.header: dict[str, Any] = dict(header or {})
        self.data = self._read()
        differences = protocol_differences(self.data["protocol"], self.blank["protocol"])
        if differences:
            raise ProtocolMismatch(self.path, differences, hint)

    def find(self, part: str = "runs", /, **key: Any) -> dict[str, Any] | None:
        """The first row of ``part`` whose fields equal ``key`` (None: not run yet)."""
        return next((r for r in self.data[part] if all(r.get(k) == v for k, v in key.items())), None)

    def add(self, row: Mapping[str, Any], part: str = "runs") -> None:
        """Append ``row`` to ``part`` and write the file (keeping rows other processes wrote meanwhile)."""
        self.update(lambda data: data[part].append(dict(row)))

    def update(self, change: Callable[[Document], None]) -> None:
        """Apply ``change`` to the document as the file holds it now, then write it: under the lock, atomically.

        ``change`` may run on a document other processes have added to since this one read it; it should
        only add (rows of its own, a field), so that nothing another process wrote is lost.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            data = self._read()
            change(data)
            data.update(self.header)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(self.path)
            self.data = data

    def _read(self) -> Document:
        data: Document = json.loads(self.path.read_text()) if self.path.is_file() else {}
        for key, value in self.blank.items():
            data.setdefault(key, json.loads(json.dumps(value)))
        return data

    @contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl  # POSIX; imported here so that the package imports where it is missing

        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
