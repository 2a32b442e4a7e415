"""What an attack sends to one tower (text or image) and how its answers become training rows.

A ``Tower`` knows the tower's input and output ports, asks the backbone one call (and, with
gradients, its VJP), builds the matching student, and turns a call's answers into replay rows.

With gradients, the text attack adds a zero shift ``[B, 1, D]`` at ``text.token_embeds`` (the DGA
shift direction) and gets back its VJP ``[B, 1, D]`` for a random output gradient; the image attack
sends pixels that require a gradient and gets back ``[B, 3, S, S]``. One forward is one call, its
VJP one more (``graytune.audit.meter``).

Example:
    >>> tower = tower_for(handle.spec, "text", image_size=64, tokenize=handle.tokenize)
    >>> answer = tower.query(handle, ["a cat", "a dog"], grad=True)   # batch, outputs, v, vjp
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graytune.audit.data import Items, Pixels
from graytune.audit.students import BagOfTokens, Batch, ConvStudent
from graytune.errors import InvalidInputError
from graytune.types import AccessLevel, BackboneSpec, Op

Tensor = torch.Tensor


@dataclass
class Answer:
    """One call's answers: the student's batch, outputs ``[B, E]``, and the VJP pair when gradients were asked."""

    batch: Batch
    outputs: Tensor
    v: Tensor | None = None
    vjp: Tensor | None = None  # text [B, D]; image [B, 3, S, S]


class TextTower:
    """``text.input_ids`` in, ``text.embeds`` out; Jacobians at a shift of ``text.token_embeds``."""

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

    def can_grad(self, level: AccessLevel) -> bool:
        return level >= AccessLevel.DARK_GRAY and Op.ADD in self.spec.port(self.grad_port).ops

    def student(self) -> nn.Module:
        return BagOfTokens(self.vocab, self.dim, self.out_dim)

    def prepare(self, items: Items) -> Batch:
        tokens = self.tokenize(list(items))
        return tokens["text.input_ids"], tokens["text.attention_mask"]

    def query(self, handle: Any, items: Items, grad: bool) -> Answer:
        ids, mask = self.prepare(items)
        inputs = {"text.input_ids": ids, "text.attention_mask": mask}
        if not grad:
            with torch.no_grad():
                out = handle.forward(inputs, outputs=[self.output])[self.output]
            return Answer((ids, mask), out.float())
        shift = torch.zeros(len(ids), 1, self.dim, requires_grad=True)
        out = handle.forward(inputs, add={self.grad_port: shift}, outputs=[self.output])[self.output]
        v = torch.randn_like(out)
        (vjp,) = torch.autograd.grad(out, shift, v)
        return Answer((ids, mask), out.detach().float(), v, vjp[:, 0].float())

    def rows(self, answer: Answer) -> list[Tensor]:
        """The replay columns: ids and mask padded to ``width``, outputs, and v and the VJP when asked."""
        ids, mask = answer.batch  # type: ignore[misc]
        padded = torch.zeros(len(ids), self.width, dtype=torch.int32)
        kept = torch.zeros(len(ids), self.width, dtype=torch.int8)
        cols = min(self.width, ids.shape[1])
        padded[:, :cols], kept[:, :cols] = ids[:, :cols], mask[:, :cols]
        columns = [padded, kept, answer.outputs]
        if answer.v is not None and answer.vjp is not None:
            columns += [answer.v, answer.vjp]
        return columns

    def collate(self, columns: list[Tensor]) -> tuple[Batch, list[Tensor]]:
        ids, mask = columns[0], columns[1]
        width = max(1, int(mask.sum(1).max()))
        return (ids[:, :width].long(), mask[:, :width].long()), columns[2:]

    def row_bytes(self, grad: bool) -> int:
        return 5 * self.width + 4 * self.out_dim * (2 if grad else 1) + (4 * self.dim if grad else 0)


class ImageTower:
    """``image.pixels`` in, ``image.embeds`` out; Jacobians at the pixels."""

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

    def student(self) -> nn.Module:
        return ConvStudent(self.out_dim)

    def prepare(self, items: Items) -> Batch:
        return self.pixels(items)

    def query(self, handle: Any, items: Items, grad: bool) -> Answer:
        x = self.prepare(items)
        if not grad:
            with torch.no_grad():
                out = handle.forward({self.grad_port: x}, outputs=[self.output])[self.output]
            return Answer(x, out.float())
        x = x.clone().requires_grad_(True)
        out = handle.forward({self.grad_port: x}, outputs=[self.output])[self.output]
        v = torch.randn_like(out)
        (vjp,) = torch.autograd.grad(out, x, v)
        return Answer(x.detach(), out.detach().float(), v, vjp.float())

    def rows(self, answer: Answer) -> list[Tensor]:
        columns = [answer.batch, answer.outputs]  # type: ignore[list-item]
        if answer.v is not None and answer.vjp is not None:
            columns += [answer.v, answer.vjp]
        return columns

    def collate(self, columns: list[Tensor]) -> tuple[Batch, list[Tensor]]:
        return columns[0], columns[1:]

    def row_bytes(self, grad: bool) -> int:
        pixels = 4 * 3 * self.size * self.size
        return pixels * (2 if grad else 1) + 4 * self.out_dim * (2 if grad else 1)


Tower = TextTower | ImageTower


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
