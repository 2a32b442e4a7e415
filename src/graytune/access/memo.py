"""Plain forwards answered from memory, so each distinct input crosses the boundary once.

A frozen backbone gives the same output for the same input. A client that trains only adapters after the
output port (black-box output adapters, a linear probe) sends the same texts or images every epoch; over a
server or a paid API each of those calls costs a query. ``memoize`` keeps each row's output the first time it
comes back and answers later requests for that row from memory.

Example:
    >>> h = graytune.memoize(graytune.open_backbone("minilm", access="black-box"), max_mb=256)
    >>> model = AdaptedModel.build(h, "output")    # graytune.model.AdaptedModel: each distinct text embedded once
    >>> h.hits, h.misses                                    # rows answered from memory / by the backbone
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from graytune.access.handle import Handle
from graytune.errors import InvalidInputError
from graytune.types import AccessLevel, BackboneSpec, Exposure

Tensor = torch.Tensor


def memoize(handle: Handle, max_mb: float = 512.0) -> MemoHandle:
    """``handle`` with its plain forwards remembered per input row, up to ``max_mb`` of outputs (oldest dropped).

    Args:
        handle: a black-box, dark-gray or light-gray handle (in process or remote).
        max_mb: the most memory the remembered outputs may take, in MB; the least recently used rows go first.

    Raises:
        InvalidInputError: a white-box handle (its module can be changed in place, so an output seen once may
            not hold later), or ``max_mb`` not above zero.
    """
    return MemoHandle(handle, max_mb)


class MemoHandle:
    """A handle whose plain forwards are answered from memory for rows it has seen. Make one with ``memoize``.

    What is remembered: one output row per (output port, input row), for forwards with no ``add``, ``insert``
    or ``reads`` and no input that requires a gradient; anything else goes to the backbone unchanged. A row is
    known by its input values: token ids where the attention mask is set (so padding does not matter), pixel
    values, or the string. Answers from memory are not backbone queries, so ``exposure`` does not count them.
    """

    def __init__(self, handle: Handle, max_mb: float = 512.0) -> None:
        if handle.access is AccessLevel.WHITE_BOX:
            raise InvalidInputError("memoize: received a white-box handle; its module can change in place, so a "
                                    "remembered output may be stale. Memoize a black-box, dark-gray or "
                                    "light-gray handle")
        if not max_mb > 0:
            raise InvalidInputError(f"memoize: max_mb must be above 0, got {max_mb!r}")
        self.handle, self.max_bytes = handle, int(max_mb * 2**20)
        self._rows: OrderedDict[tuple[str, bytes], Tensor] = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    def __repr__(self) -> str:
        return f"MemoHandle({self.handle!r}, rows={len(self._rows)}, hits={self.hits}, misses={self.misses})"

    @property
    def access(self) -> AccessLevel:
        return self.handle.access

    @property
    def spec(self) -> BackboneSpec:
        return self.handle.spec

    @property
    def exposure(self) -> Exposure:
        return self.handle.exposure

    @property
    def device(self) -> torch.device:
        return self.handle.device

    @property
    def grants(self) -> frozenset[str]:
        return self.handle.grants

    @property
    def fingerprint(self) -> str:
        return self.handle.fingerprint

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        return self.handle.tokenize(texts)

    def forward(self, inputs: Mapping[str, Tensor | Sequence[str]], *, add: Mapping[str, Tensor] | None = None,
                insert: Mapping[str, Tensor] | None = None, outputs: Sequence[str] | None = None,
                reads: Sequence[str] = ()) -> dict[str, Tensor]:
        """As ``Handle.forward``; plain requests naming their ``outputs`` are answered row by row from memory."""
        keys = None if add or insert or reads or not outputs else row_keys(inputs)
        if keys is None:
            return self.handle.forward(inputs, add=add, insert=insert, outputs=outputs, reads=reads)
        missing = [i for i, key in enumerate(keys) if any((port, key) not in self._rows for port in outputs)]
        out: dict[str, list[Tensor | None]] = {port: [None] * len(keys) for port in outputs}
        absent = set(missing)
        for i, key in enumerate(keys):
            if i not in absent:
                for port in outputs:
                    out[port][i] = self._rows[(port, key)]
                    self._rows.move_to_end((port, key))
        if missing:
            fresh = self.handle.forward(take_rows(inputs, missing), outputs=outputs)
            for port in outputs:
                for j, i in enumerate(missing):
                    out[port][i] = row = fresh[port][j].detach()
                    self._remember((port, keys[i]), row)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return {port: torch.stack(rows) for port, rows in out.items()}  # type: ignore[arg-type]

    def _remember(self, key: tuple[str, bytes], row: Tensor) -> None:
        size = row.numel() * row.element_size()
        if key in self._rows:
            self.bytes -= self._rows[key].numel() * self._rows[key].element_size()
        self._rows[key] = row.clone()  # its own storage: a view would keep the whole batch alive
        self.bytes += size
        while self.bytes > self.max_bytes and len(self._rows) > 1:
            _, old = self._rows.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def encode_image(self, pixels: Tensor, **edits: Mapping[str, Tensor]) -> Tensor:
        """``[B, E]`` image embeddings, remembered when ``edits`` is empty."""
        return self.forward({"image.pixels": pixels}, outputs=["image.embeds"], **edits)["image.embeds"]

    def encode_text(self, text: Sequence[str] | Mapping[str, Tensor], **edits: Mapping[str, Tensor]) -> Tensor:
        """``[B, E]`` text embeddings for strings or tokenized ids, remembered when ``edits`` is empty."""
        inputs = dict(text) if isinstance(text, Mapping) else {"text": text}
        return self.forward(inputs, outputs=["text.embeds"], **edits)["text.embeds"]

    def module(self) -> nn.Module:
        return self.handle.module()  # refused below white-box, and a memo never wraps white-box

    def with_module(self, module: nn.Module) -> Handle:
        return self.handle.with_module(module)


def row_keys(inputs: Mapping[str, Tensor | Sequence[str]]) -> list[bytes] | None:
    """One digest per input row, or None when the request cannot be remembered (an input needs a gradient,
    or the inputs disagree on the batch size).

    ``[B, L]`` tensors beside a ``<modality>.attention_mask`` are keyed by their values where the mask is set,
    so a text padded to another batch's length has the same key.
    """
    digests: list[Any] | None = None
    for name in sorted(inputs):
        value = inputs[name]
        if isinstance(value, Tensor):
            if value.requires_grad:
                return None
            rows = _tensor_rows(name, value, inputs)
        else:
            rows = [str(v).encode() for v in value]
        if digests is None:
            digests = [hashlib.blake2b(digest_size=20) for _ in rows]
        if len(rows) != len(digests):
            return None
        for digest, row in zip(digests, rows):
            digest.update(name.encode() + b"\0" + len(row).to_bytes(8, "little") + row)
    return None if not digests else [d.digest() for d in digests]


def _tensor_rows(name: str, value: Tensor, inputs: Mapping[str, Tensor | Sequence[str]]) -> list[bytes]:
    mask = inputs.get(f"{name.split('.')[0]}.attention_mask")
    flat = value.detach().cpu()
    head = f"{flat.dtype}".encode()
    if isinstance(mask, Tensor) and value.dim() == 2 and mask.shape == value.shape:
        keep = mask.detach().cpu().bool()
        return [head + _bytes(flat[i][keep[i]]) for i in range(len(flat))]
    return [head + str(tuple(flat.shape[1:])).encode() + _bytes(flat[i]) for i in range(len(flat))]


def _bytes(t: Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()  # any dtype, bf16 included


def take_rows(inputs: Mapping[str, Tensor | Sequence[str]], rows: list[int]) -> dict[str, Tensor | Sequence[str]]:
    """The same request with only ``rows`` of every input."""
    index = torch.tensor(rows)
    return {name: value[index.to(value.device)] if isinstance(value, Tensor) else [value[i] for i in rows]
            for name, value in inputs.items()}
