"""What every adapter declares at class level, tower, white-box or logit alike.

The method registry derives a method's level, read grants, ports and options from
these declarations, never from a second table.
"""

from __future__ import annotations

from typing import ClassVar

from graytune.types import AccessLevel


#: Per modality, the input port holding its token embeddings (``{tokens}`` in a port pattern).
INPUT_TOKENS = {"text": "token_embeds", "image": "patch_embeds"}


def port_name(pattern: str, modality: str) -> str:
    """``pattern`` for one ``modality``: ``"{m}.{tokens}"`` → ``image.patch_embeds``."""
    return pattern.format(m=modality, tokens=INPUT_TOKENS.get(modality, "token_embeds"))


class Declared:
    """Class-level declarations of an adapter (a mix-in: no state, no behaviour)."""

    name: ClassVar[str] = ""
    """The registry name (= the file name)."""
    min_access: ClassVar[AccessLevel] = AccessLevel.DARK_GRAY
    """The lowest access level it works at."""
    zo_access: ClassVar[AccessLevel | None] = None
    """The lowest level at which it trains zeroth-order, from forward calls alone (its config's
    ``zeroth_order`` option: its tensors then ask the boundary for no gradient); None: it cannot."""
    config_class: ClassVar[type] = object
    """The dataclass of its options (each field documented by the string under it)."""
    port_patterns: ClassVar[tuple[str, ...]] = ()
    """Ports it edits, with ``{m}`` for the modality (``{m}.layer.*``: some declared entry layers) and
    ``{tokens}`` for the modality's input-token port (``INPUT_TOKENS``)."""
    read_patterns: ClassVar[tuple[str, ...]] = ()
    """Ports whose values it must read, which the owner grants explicitly (same pattern syntax)."""
    trains: ClassVar[str] = ""
    """What it trains, in a few words (for ``graytune methods``)."""
