"""Edits to token sequences at a port: add a delta, insert or overwrite tokens, place prompts; masked pooling.

Towers call these at their input and entry ports (``<m>.token_embeds``, ``<m>.layer.k``,
``<m>.prompts.k``); the shapes are ``[B, L, D]`` values and ``[B, L]`` masks (1 real, 0 padding).
``PortEdits`` gathers one forward's requests at one tower, for towers that apply them port by port.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import torch

from graytune.errors import InvalidInputError
from graytune.types import prompts_port

Tensor = torch.Tensor


def add_delta(port: str, values: Tensor, delta: Tensor, mask: Tensor | None = None) -> Tensor:
    """``values + delta`` (broadcast), the delta kept off padding positions when ``mask`` is given."""
    try:
        torch.broadcast_shapes(delta.shape, values.shape)
    except RuntimeError:
        raise InvalidInputError(
            f"add at {port}: a delta of shape {list(delta.shape)} does not broadcast onto the "
            f"port's values of shape {list(values.shape)}; send a shape like "
            f"{[1] * (values.dim() - 1) + [values.shape[-1]]} or {list(values.shape)}"
        ) from None
    if mask is not None:
        delta = delta * mask.unsqueeze(-1).to(values.dtype)
    return values + delta


def insert_tokens(
    port: str, values: Tensor, mask: Tensor, tokens: Tensor, at: Tensor
) -> tuple[Tensor, Tensor]:
    """Place ``tokens`` in each row of ``values`` before position ``at[b]``.

    Args:
        values: ``[B, L, D]`` sequence.
        mask: ``[B, L]`` attention mask (1 real, 0 padding).
        tokens: ``[B or 1, K, D]`` tokens to insert.
        at: ``[B]`` insert position per row.

    Returns:
        ``[B, L+K, D]`` values and ``[B, L+K]`` mask (inserted tokens are real).
    """
    batch, length, dim = values.shape
    k = _token_count(port, values, tokens)
    joined = torch.cat([values, tokens.expand(batch, k, dim)], dim=1)  # [B, L+K, D]
    pos = torch.arange(length + k, device=values.device).unsqueeze(0)  # [1, L+K]
    at = at.to(values.device).unsqueeze(1)  # [B, 1]
    src = torch.where(pos < at, pos, torch.where(pos < at + k, length + pos - at, pos - k))
    new_values = joined.gather(1, src.unsqueeze(-1).expand(-1, -1, dim))
    new_mask = torch.cat([mask, mask.new_ones(batch, k)], dim=1).gather(1, src)
    return new_values, new_mask


def _token_count(port: str, values: Tensor, tokens: Tensor) -> int:
    """K of ``tokens`` ``[B or 1, K, D]`` sent to ``port``, whose ``values`` are ``[B, L, D]``."""
    batch, _, dim = values.shape
    if tokens.dim() != 3 or tokens.shape[0] not in (1, batch) or tokens.shape[2] != dim:
        raise InvalidInputError(
            f"insert at {port}: got tokens of shape {list(tokens.shape)}; expected "
            f"[1, K, {dim}] or [{batch}, K, {dim}]"
        )
    return int(tokens.shape[1])


def overwrite_tokens(port: str, values: Tensor, tokens: Tensor, at: Tensor) -> Tensor:
    """``values`` with positions ``at[b] .. at[b]+K-1`` of each row replaced by ``tokens``.

    Args:
        values: ``[B, L, D]`` sequence.
        tokens: ``[B or 1, K, D]`` tokens to write.
        at: ``[B]`` first position written per row (``at[b] + K <= L``).

    Returns:
        ``[B, L, D]`` values; what was at those positions gets no gradient.
    """
    batch, length, dim = values.shape
    k = _token_count(port, values, tokens)
    offset = torch.arange(length, device=values.device).unsqueeze(0) - at.to(values.device).unsqueeze(1)  # [B, L]
    if bool((offset[:, -1] < k - 1).any()):
        raise InvalidInputError(f"insert at {port}: {k} tokens written from positions {at.tolist()} pass the end "
                                f"of rows of {length} positions: the tower placed its prompts wrongly, a graytune "
                                "bug; please report it")
    inside = (offset >= 0) & (offset < k)  # [B, L]
    picked = offset.clamp(0, k - 1).unsqueeze(-1).expand(-1, -1, dim)  # [B, L, D] the token each position takes
    written = tokens.to(values.dtype).expand(batch, k, dim).gather(1, picked)  # [B, L, D]
    return torch.where(inside.unsqueeze(-1), written, values)


class PromptSlots:
    """Where one forward's prompt tokens sit in one tower (the ``<m>.prompts.k`` ports, VPT-deep).

    The first prompts port (in layer order) that gets tokens inserts them, as an insert at its
    ``<m>.layer.k`` would; each later one writes over those K positions, so the sequence keeps one block
    of prompts (L+K tokens) instead of growing by K per layer. A tower makes one per forward and sends
    its plain ``<m>.layer.k`` inserts through ``insert`` too, so the block is followed when they land
    before it. At one layer the plain insert goes first, then the prompts.

    Example:
        >>> prompts = PromptSlots()
        >>> for k, layer in enumerate(layers):
        ...     hidden, mask = prompts.place(f"text.layer.{k}", hidden, mask, insert, at=1)  # after [CLS]
    """

    def __init__(self) -> None:
        self.start: Tensor | None = None  # [B] first position of the block, once placed
        self.count = 0  # K
        self.placed_by = ""  # the prompts port that placed it

    def place(self, port: str, values: Tensor, mask: Tensor, insert: Mapping[str, Tensor],
              at: int) -> tuple[Tensor, Tensor]:
        """The tokens ``insert`` holds for ``port`` (a plain insert), then for its prompts port, each placed
        before position ``at`` of every row; a negative ``at`` counts from the end of the sequence as it
        stands when each is placed (-1: before the last position). Nothing is built when neither is sent.

        Towers whose insert position differs per row (CLIP's end token) call ``insert`` and ``take``.
        """
        if port in insert:
            values, mask = self.insert(port, values, mask, insert[port], _positions(values, at))
        if prompts_port(port) in insert:
            values, mask = self.take(port, values, mask, insert, _positions(values, at))
        return values, mask

    def insert(self, port: str, values: Tensor, mask: Tensor, tokens: Tensor, at: Tensor) -> tuple[Tensor, Tensor]:
        """``insert_tokens`` (a plain insert before ``at``), moving the block along where it lands before it."""
        values, mask = insert_tokens(port, values, mask, tokens, at)
        if self.start is not None:
            self.start = self.start + tokens.shape[1] * (at.to(self.start.device) <= self.start).long()
        return values, mask

    def take(self, layer_port: str, values: Tensor, mask: Tensor, insert: Mapping[str, Tensor],
             at: Tensor) -> tuple[Tensor, Tensor]:
        """The tokens ``insert`` holds for the prompts port beside ``layer_port``, if any: inserted before
        ``at`` when no block is placed yet, else written over the block (the mask unchanged).

        Raises:
            InvalidInputError: their K differs from the block's (the message names both ports).
        """
        port = prompts_port(layer_port)
        if port not in insert:
            return values, mask
        tokens = insert[port]
        if self.start is None:
            values, mask = insert_tokens(port, values, mask, tokens, at)
            self.start, self.count, self.placed_by = at.to(values.device), int(tokens.shape[1]), port
            return values, mask
        if tokens.dim() == 3 and tokens.shape[1] != self.count:
            raise InvalidInputError(
                f"insert at {port}: got {tokens.shape[1]} prompt tokens, but {self.placed_by} placed "
                f"{self.count} in this request; each later prompts port writes over the tokens the first one "
                f"placed, so every prompts port of a tower takes the same K: send {self.count} here (or insert at "
                f"{layer_port} to add tokens to the sequence)"
            )
        return overwrite_tokens(port, values, tokens, self.start), mask


@dataclass
class PortEdits:
    """One forward's requests at one tower's ports, applied port by port as the tower runs.

    Attributes:
        add: per port, a delta broadcast onto its values.
        insert: per port, ``[B or 1, K, D]`` tokens (plain inserts and prompts ports alike).
        reads: ports whose values (before any edit there) go to ``out``.
        out: where the values read are put (the dict ``run`` returns).
        prompts: where this forward's prompt tokens sit in the tower.

    Example:
        >>> edits = PortEdits(add, insert, reads, out)
        >>> hidden = edits.read_and_add("text.layer.1", hidden, mask)
        >>> hidden, mask = edits.place("text.layer.1", hidden, mask, at=1)  # after [CLS]
    """

    add: Mapping[str, Tensor]
    insert: Mapping[str, Tensor]
    reads: Collection[str]
    out: dict[str, Tensor]
    prompts: PromptSlots = field(default_factory=PromptSlots)

    def read_and_add(self, port: str, values: Tensor, mask: Tensor | None = None) -> Tensor:
        """``values`` noted in ``out`` when ``port`` is read, then with the delta sent to ``port`` added
        (``add_delta``: kept off padding when ``mask`` is given)."""
        if port in self.reads:
            self.out[port] = values
        if port in self.add:
            values = add_delta(port, values, self.add[port], mask)
        return values

    def place(self, port: str, values: Tensor, mask: Tensor, at: int) -> tuple[Tensor, Tensor]:
        """The tokens sent to ``port`` and to its prompts port, placed before position ``at`` of every row
        (``PromptSlots.place``; negative ``at`` counts from the end)."""
        return self.prompts.place(port, values, mask, self.insert, at)

    def place_before(self, port: str, values: Tensor, mask: Tensor, at: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """As ``place``, before ``at[b]`` in row b (a token each row has in its own place, e.g. CLIP's end token).

        Returns:
            values ``[B, L', D]``, mask ``[B, L']``, and ``[B]``: where the token at ``at`` moved to.
        """
        if port in self.insert:
            values, mask = self.prompts.insert(port, values, mask, self.insert[port], at)
            at = at + self.insert[port].shape[1]
        length = values.shape[1]
        values, mask = self.prompts.take(port, values, mask, self.insert, at)  # before that token too
        return values, mask, at + (values.shape[1] - length)


def _positions(values: Tensor, at: int) -> Tensor:
    """``[B]``: position ``at`` of every row of ``values`` ``[B, L, D]`` (negative: counted from the end)."""
    return torch.full((len(values),), at if at >= 0 else values.shape[1] + at, dtype=torch.long,
                      device=values.device)


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` ``[B, L, D]`` over real tokens of ``mask`` ``[B, L]`` → ``[B, D]``."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
