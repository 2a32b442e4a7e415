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

    def __init__(self, what: str, needed: str, granted: str, hint: str = "", *, message: str | None = None) -> None:
        """``what`` needs the level ``needed``; the handle holds ``granted``; ``hint`` says what to do.

        ``message`` replaces the sentence built from them where it would not read well (an explicit read grant,
        a server's level), keeping the attributes.
        """
        self.what, self.needed, self.granted = what, needed, granted
        msg = message or f"{what} needs access level {needed}; this handle was granted {granted}"
        if hint and message is None:
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


class RemoteAccessDeniedError(AccessDeniedError, RemoteError):
    """A backbone server's 403 (``access_denied``): the ``AccessDeniedError`` the same request raises in process,
    with the ``status`` and ``kind`` of a ``RemoteError``. Its message is the server's, naming the level needed."""

    def __init__(self, detail: str, needed: str = "", granted: str = "") -> None:
        self.what, self.needed, self.granted = "", needed, granted
        self.status, self.kind = 403, "access_denied"
        Exception.__init__(self, detail)  # AccessDeniedError's and RemoteError's own sentences would wrap it
