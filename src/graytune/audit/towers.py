"""What an attack sends to one tower (text or image) and how its answers become training rows.

A ``Tower`` knows the tower's input and output ports, asks the backbone one call in one of three ways
(``query``), builds the matching student, and turns a call's answers into replay rows:

- ``outputs`` (black-box): one row per item, no edit, no gradient.
- ``differences`` (black-box): each item once as it is and ``k`` more times with an edit ``ε u`` at its
  input (text: a per-token edit ``[L, D]`` added at ``text.token_embeds``, each token moved by ``ε``;
  images: the pixels moved by ``ε`` in all), all in one forward without a gradient. The output
  differences are finite-difference slopes ``(f(x + ε u) − f(x)) / ε ≈ J u``.
- ``vjp`` (dark-gray and up): each item ``c`` times (``cotangents``), each copy with its own per-token edit
  ``[L, D]`` (text) or pixels, asked for a gradient; the VJP gives each copy its own output cotangent, so
  ``c`` rows ``vᵀ J`` come back per item, per token (``[L, D]``) or per pixel. The copies' edits are a
  tiny jitter (``JITTER``), so that no two rows are the same input.

One forward is one call, its VJP one more (``graytune.audit.meter``).

Example:
    >>> tower = tower_for(handle.spec, "text", image_size=64, tokenize=handle.tokenize)
    >>> answer = tower.query(handle, ["a cat", "a dog"], Probe("vjp", 4))   # 2 outputs, 8 per-token VJPs
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graytune.audit.data import Items, Pixels
from graytune.audit.students import AttentiveBag, Batch, ConvStudent
from graytune.errors import InvalidInputError
from graytune.types import AccessLevel, BackboneSpec, Op

Tensor = torch.Tensor
#: token positions of a text whose edits and per-token VJPs an attack keeps (WordNet glosses: 99.9 % fit)
GRAD_WIDTH = 48
#: the copies' per-coordinate edit in a ``vjp`` query: the rows differ, the Jacobian does not (to ~1e-4)
JITTER = 1e-4
MODES = ("outputs", "differences", "vjp")


@dataclass(frozen=True)
class Probe:
    """How one call asks: ``mode`` (``MODES``), ``per_item`` (edits per item for ``differences``, cotangents per
    item for ``vjp``) and ``epsilon`` (the finite-difference step)."""

    mode: str = "outputs"
    per_item: int = 1
    epsilon: float = 1e-2

    def rows(self, items: int) -> int:
        """Rows sent for ``items`` items."""
        return items * {"outputs": 1, "differences": 1 + self.per_item, "vjp": self.per_item}[self.mode]

    def items(self, rows: int) -> int:
        """Items that fit in ``rows`` rows (at least one)."""
        return max(1, rows // self.rows(1))


@dataclass
class Answer:
    """One call's answers: the items' batch and outputs ``[N, E]``; for a probe, the rows it was taken on
    (``probe_batch``, items repeated), what it was taken along (``along``: edit directions ``u`` or output
    cotangents ``v``) and what came back (``derivative``: slopes ``[M, E]`` or VJPs)."""

    batch: Batch
    outputs: Tensor
    probe_batch: Batch | None = None
    along: Tensor | None = None
    derivative: Tensor | None = None


class TextTower:
    """``text.input_ids`` in, ``text.embeds`` out; edits and Jacobians at ``text.token_embeds``, per token."""

    modality = "text"
    output = "text.embeds"
    grad_port = "text.token_embeds"

    def __init__(self, spec: BackboneSpec, tokenize: Callable[[Sequence[str]], dict[str, Tensor]]) -> None:
        self.spec, self.tokenize = spec, tokenize
        self.vocab = int(spec.preprocess.get("text", {}).get("vocab_size", 0))
        if self.vocab <= 0:
            raise InvalidInputError(f"{spec.id} publishes no text vocab_size in its spec; the audit's student "
                                    "needs it to hold one row per token id")
        self.dim = int(spec.port(self.grad_port).shape[-1])
        self.out_dim = int(spec.port(self.output).shape[-1])
        #: tokens kept per replayed text (the tokenizer's own limit, at most 512)
        self.width = min(512, int(spec.preprocess.get("text", {}).get("max_tokens", 128)))
        self.grad_width = min(self.width, GRAD_WIDTH)

    def can_grad(self, level: AccessLevel) -> bool:
        return level >= AccessLevel.DARK_GRAY and Op.ADD in self.spec.port(self.grad_port).ops

    def can_edit(self, level: AccessLevel) -> bool:
        """Whether a client at ``level`` may add at the input port without a gradient (black-box may)."""
        return Op.ADD in self.spec.port(self.grad_port).ops

    def student(self) -> nn.Module:
        return AttentiveBag(self.vocab, self.dim, self.out_dim, positions=self.width)

    def prepare(self, items: Items) -> Batch:
        tokens = self.tokenize(list(items))
        return tokens["text.input_ids"], tokens["text.attention_mask"]

    def forward(self, handle: Any, batch: Batch, edit: Tensor | None = None) -> Tensor:
        """The backbone's outputs ``[N, E]`` for ``batch``, ``edit [N, L, D]`` added at the token embeddings."""
        ids, mask = batch  # type: ignore[misc]
        add = {} if edit is None else {self.grad_port: edit}
        return handle.forward({"text.input_ids": ids, "text.attention_mask": mask}, add=add,
                              outputs=[self.output])[self.output]

    def repeat(self, batch: Batch, times: int) -> Batch:
        ids, mask = batch  # type: ignore[misc]
        return ids.repeat_interleave(times, 0), mask.repeat_interleave(times, 0)

    def directions(self, batch: Batch, generator: torch.Generator) -> Tensor:
        """Random per-token edit directions ``[N, L, D]`` on the first ``grad_width`` real tokens, each token's of
        norm 1, rounded to float16 (the replay keeps them so; the backbone gets the same values)."""
        ids, mask = batch  # type: ignore[misc]
        u = torch.randn(*ids.shape, self.dim, generator=generator)
        u = u / u.norm(dim=-1, keepdim=True) * mask.unsqueeze(-1)
        u[:, self.grad_width:] = 0
        return u.half().float()

    def jitter(self, batch: Batch, generator: torch.Generator) -> Tensor:
        ids, _ = batch  # type: ignore[misc]
        return JITTER * torch.randn(*ids.shape, self.dim, generator=generator)

    def keep(self, per_position: Tensor) -> Tensor:
        """A derivative or direction ``[N, L, D]`` as the replay keeps it: ``grad_width`` positions."""
        out = per_position.new_zeros(len(per_position), self.grad_width, self.dim)
        cols = min(self.grad_width, per_position.shape[1])
        out[:, :cols] = per_position[:, :cols]
        return out

    def rows(self, batch: Batch, *columns: Tensor) -> list[Tensor]:
        """Replay columns: ids and mask padded to ``width``, then ``columns``."""
        ids, mask = batch  # type: ignore[misc]
        padded = torch.zeros(len(ids), self.width, dtype=torch.int32)
        kept = torch.zeros(len(ids), self.width, dtype=torch.int8)
        cols = min(self.width, ids.shape[1])
        padded[:, :cols], kept[:, :cols] = ids[:, :cols], mask[:, :cols]
        return [padded, kept, *columns]

    def collate(self, columns: list[Tensor]) -> tuple[Batch, list[Tensor]]:
        ids, mask = columns[0], columns[1]
        width = max(1, int(mask.sum(1).max()))
        return (ids[:, :width].long(), mask[:, :width].long()), columns[2:]

    def row_bytes(self, kind: str) -> int:
        """Replay bytes of one row: ``outputs``, or a ``differences``/``vjp`` derivative row."""
        derivative = {"outputs": 0, "differences": 2 * self.grad_width * self.dim + 4 * self.out_dim,
                      "vjp": 4 * self.out_dim + 2 * self.grad_width * self.dim}[kind]
        return 5 * self.width + (4 * self.out_dim if kind == "outputs" else derivative)


class ImageTower:
    """``image.pixels`` in, ``image.embeds`` out; edits and Jacobians at the pixels."""

    modality = "image"
    output = "image.embeds"
    grad_port = "image.pixels"

    def __init__(self, spec: BackboneSpec, image_size: int) -> None:
        self.spec = spec
        self.pixels = Pixels(spec, image_size)
        self.out_dim = int(spec.port(self.output).shape[-1])

    @property
    def size(self) -> int:
        return self.pixels.size

    def can_grad(self, level: AccessLevel) -> bool:
        return level >= AccessLevel.DARK_GRAY

    def can_edit(self, level: AccessLevel) -> bool:
        return True  # the pixels are the raw input: any black-box image API takes any pixels

    def student(self) -> nn.Module:
        return ConvStudent(self.out_dim)

    def prepare(self, items: Items) -> Batch:
        return self.pixels(items)

    def forward(self, handle: Any, batch: Batch, edit: Tensor | None = None) -> Tensor:
        pixels = batch if edit is None else batch + edit  # type: ignore[operator]
        return handle.forward({self.grad_port: pixels}, outputs=[self.output])[self.output]

    def repeat(self, batch: Batch, times: int) -> Batch:
        return batch.repeat_interleave(times, 0)  # type: ignore[union-attr]

    def directions(self, batch: Batch, generator: torch.Generator) -> Tensor:
        u = torch.randn(batch.shape, generator=generator)  # type: ignore[union-attr]
        return (u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).half().float()

    def jitter(self, batch: Batch, generator: torch.Generator) -> Tensor:
        return JITTER * torch.randn(batch.shape, generator=generator)  # type: ignore[union-attr]

    def keep(self, per_pixel: Tensor) -> Tensor:
        return per_pixel

    def rows(self, batch: Batch, *columns: Tensor) -> list[Tensor]:
        return [batch, *columns]  # type: ignore[list-item]

    def collate(self, columns: list[Tensor]) -> tuple[Batch, list[Tensor]]:
        return columns[0], columns[1:]

    def row_bytes(self, kind: str) -> int:
        pixels = 4 * 3 * self.size * self.size
        derivative = {"outputs": 4 * self.out_dim, "differences": pixels // 2 + 4 * self.out_dim,
                      "vjp": 4 * self.out_dim + pixels // 2}[kind]
        return pixels + derivative


Tower = TextTower | ImageTower


def query(tower: Tower, handle: Any, items: Items, probe: Probe, generator: torch.Generator) -> Answer:
    """One call (``outputs``, ``differences``) or a call and its VJP (``vjp``) on ``items``; see the module."""
    batch = tower.prepare(items)
    if probe.mode == "outputs":
        with torch.no_grad():
            return Answer(batch, tower.forward(handle, batch).float())
    rows = tower.repeat(batch, probe.rows(1))
    if probe.mode == "differences":
        k = probe.per_item
        u = tower.directions(tower.repeat(batch, k), generator)  # [N k, ...]
        edits = torch.cat([torch.zeros_like(u[:1]).expand(len(u) // k, *u.shape[1:]), probe.epsilon * u])
        order = _interleave(len(u) // k, k)
        with torch.no_grad():
            out = tower.forward(handle, rows, edits[order]).float()  # [N (1 + k), E]
        out = out.view(-1, 1 + k, out.shape[-1])
        slopes = ((out[:, 1:] - out[:, :1]) / probe.epsilon).flatten(0, 1)  # [N k, E]
        return Answer(batch, out[:, 0], tower.repeat(batch, k), tower.keep(u).half(), slopes)
    edit = tower.jitter(rows, generator).requires_grad_(True)
    out = tower.forward(handle, rows, edit)  # [N c, E]
    v = _cotangents(len(out) // probe.per_item, probe.per_item, out.shape[-1], generator)
    (grad,) = torch.autograd.grad(out, edit, v)
    outputs = out.detach().float().view(-1, probe.per_item, out.shape[-1])[:, 0]
    return Answer(batch, outputs, rows, v, tower.keep(grad.float()).to(torch.bfloat16))


def _interleave(items: int, k: int) -> Tensor:
    """Row order putting each item's unedited row (first ``items`` rows) before its ``k`` edited ones."""
    base = torch.arange(items).unsqueeze(1)
    edited = items + torch.arange(items * k).view(items, k)
    return torch.cat([base, edited], 1).flatten()


def _cotangents(items: int, per_item: int, dim: int, generator: torch.Generator) -> Tensor:
    """``[items * per_item, E]`` output cotangents: an item's ``per_item`` are orthogonal, of norm ``sqrt(E)``."""
    g = torch.randn(items, dim, per_item, generator=generator)
    q = torch.linalg.qr(g).Q if per_item <= dim else g  # [items, E, c]
    return (q.transpose(1, 2) * dim ** 0.5).reshape(items * per_item, dim)


def tower_for(spec: BackboneSpec, modality: str, image_size: int,
              tokenize: Callable[[Sequence[str]], dict[str, Tensor]]) -> Tower:
    """The tower of ``spec`` to attack; ``modality`` is ``text``, ``image`` or ``auto``."""
    if modality == "auto":
        modality = "text" if spec.modalities == ("text",) else ("image" if "image" in spec.modalities else "text")
    if modality not in spec.modalities:
        raise InvalidInputError(f"{spec.id} has no {modality} tower (its modalities: {', '.join(spec.modalities)}); "
                                f"pass --modality {' or '.join(spec.modalities)}")
    if f"{modality}.embeds" not in spec.port_names():
        raise InvalidInputError(f"{spec.id} publishes no {modality}.embeds output; the audit compares embeddings")
    return TextTower(spec, tokenize) if modality == "text" else ImageTower(spec, image_size)
