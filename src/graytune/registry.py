"""Name → builder tables, one per kind of thing (backbones, adapters, data sets).

A name may be exact (``minilm``) or a family with an argument after a colon
(``hf-clip:/path/to/dir``): a family registers ``hf-clip:`` and its builder
receives the text after the colon.

Example:
    >>> BACKBONES = Registry("backbone")
    >>> @BACKBONES.register("minilm")
    ... def build_minilm() -> ...: ...
    >>> BACKBONES.lookup("minilm")  # (builder, None)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from graytune.errors import UnknownNameError

T = TypeVar("T", bound=Callable[..., object])


class Registry(Generic[T]):
    """A table of builders by name, with closest-match errors for unknown names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._exact: dict[str, T] = {}
        self._families: dict[str, tuple[T, str]] = {}

    def register(self, name: str, *, family_help: str = "") -> Callable[[T], T]:
        """Register a builder under ``name``; a name ending in ``:`` is a family.

        A class registered here is given its name as ``cls.name``, so the name is written once, in
        the decorator (``@ADAPTERS.register("adalink")`` over ``class AdaLink``).
        """

        def add(builder: T) -> T:
            table_has = name in self._exact or name in self._families
            if table_has:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if name.endswith(":"):
                self._families[name] = (builder, family_help)
            else:
                self._exact[name] = builder
            if isinstance(builder, type):
                builder.name = name  # type: ignore[attr-defined]
            return builder

        return add

    def names(self) -> list[str]:
        """Every registered name; families shown with their argument's help."""
        fams = [f"{n}<{h or 'arg'}>" for n, (_, h) in self._families.items()]
        return sorted(self._exact) + sorted(fams)

    def lookup(self, name: str) -> tuple[T, str | None]:
        """The builder for ``name`` and the family argument (``None`` for exact names)."""
        if name in self._exact:
            return self._exact[name], None
        prefix, sep, arg = name.partition(":")
        if sep and prefix + ":" in self._families and arg:
            return self._families[prefix + ":"][0], arg
        raise UnknownNameError(self.kind, name, self.names())
