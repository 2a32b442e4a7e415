"""One exception family for graytune.

Every error says what was received, what is allowed, and what to do. Catch
``GraytuneError`` to handle them all.

Example:
    >>> try:
    ...     graytune.open_backbone("minilmm")
    ... except graytune.UnknownNameError as err:
    ...     print(err)  # unknown backbone 'minilmm'; did you mean 'minilm'? ...
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class GraytuneError(Exception):
    """Base class of every error graytune raises on purpose."""


class UnknownNameError(GraytuneError, KeyError):
    """A name (backbone, port, method, data set) that is not known."""

    def __init__(self, kind: str, name: str, known: Iterable[str], hint: str = "") -> None:
        known = sorted(set(known))
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        parts = [f"unknown {kind} {name!r}"]
        if close:
            parts.append("did you mean " + " or ".join(repr(c) for c in close) + "?")
        parts.append("known: " + ", ".join(known) if known else f"no {kind} is available")
        if hint:
            parts.append(hint)
        self.kind, self.name, self.known, self.suggestions = kind, name, known, close
        super().__init__("; ".join(parts))

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class AccessDeniedError(GraytuneError, PermissionError):
    """An operation above the access level a backbone handle was granted."""

    def __init__(self, what: str, needed: str, granted: str, hint: str = "") -> None:
        self.what, self.needed, self.granted = what, needed, granted
        msg = f"{what} needs access level {needed}; this handle was granted {granted}"
        if hint:
            msg += f"; {hint}"
        super().__init__(msg)


class InvalidInputError(GraytuneError, ValueError):
    """A tensor or value that does not fit what a port or function accepts."""


class NumericalError(GraytuneError, ArithmeticError):
    """The backbone produced NaN or infinite values from finite inputs (e.g. an owner's half precision)."""


class ArtifactError(GraytuneError):
    """A saved artifact that is missing, damaged, or made for another backbone."""


class MissingDependencyError(GraytuneError, ImportError):
    """An optional package or a data package that is not installed."""


class RemoteError(GraytuneError):
    """A backbone server refused a request or could not be reached.

    Attributes:
        status: the HTTP status (0 when the server could not be reached).
        kind: the server's short error kind, e.g. ``unauthorized``, ``quota``, ``session_gone``.
    """

    def __init__(self, status: int, kind: str, detail: str) -> None:
        self.status, self.kind = status, kind
        super().__init__(f"backbone server answered {status} ({kind}): {detail}" if status else detail)
