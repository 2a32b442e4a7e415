"""Plain forwards and tokenizations answered from memory, so each distinct input crosses the boundary once.

A frozen backbone gives the same output for the same input. A client that trains only adapters after the
output port (black-box output adapters, a linear probe) sends the same texts or images every epoch; over a
server or a paid API each of those calls costs a query. ``memoize`` keeps each row's output the first time it
comes back and answers later requests for that row from memory.

Example:
    >>> h = graytune.memoize(graytune.open_backbone("minilm", access="black-box"), max_mb=256)
    >>> model = AdaptedModel.build(h, "output")    # graytune.model.AdaptedModel: each distinct text embedded once
    >>> h.hits, h.misses                           # rows answered from memory / by the backbone
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from graytune.access.handle import Handle, encode_image, encode_text
from graytune.errors import InvalidInputError
from graytune.types import AccessLevel

Tensor = torch.Tensor
#: what one remembered row costs besides its values (key, dict node, tensor object), measured on CPU
ROW_OVERHEAD = 1024


def memoize(handle: Handle, max_mb: float = 512.0) -> MemoHandle:
    """``handle`` with its plain forwards and its tokenizations remembered per row, up to ``max_mb`` MiB.

    Example:
        >>> h = memoize(graytune.open_backbone("minilm", access="black-box"), max_mb=256)
        >>> h.encode_text(["a cat", "a dog"]); h.encode_text(["a dog"])   # the second call: from memory
        >>> (h.misses, h.hits)
        (2, 1)

    Args:
        handle: a black-box, dark-gray or light-gray handle (in process or remote).
        max_mb: the most memory the remembered rows may take, in MiB (values, keys and per-row bookkeeping);
            the least recently used rows go first.

    Raises:
        InvalidInputError: a white-box handle (its module can be changed in place, so an output seen once may
            not hold later), or ``max_mb`` not a finite number above zero.
    """
    return MemoHandle(handle, max_mb)


class MemoHandle:
    """A handle whose plain forwards are answered from memory for rows it has seen. Make one with ``memoize``.

    What is remembered: one output row per (output port, input row), for forwards with no ``add``, ``insert``
    or ``reads`` and no input that needs a gradient; anything else goes to the backbone unchanged. A row is
    known by its values: token ids and mask up to the row's last unmasked token (trailing padding is dropped
    once the backbone has accepted that padding value, so the same text padded to another batch's length is
    the same row, while left padding or a gap in the mask makes another row), pixel values, or the string.
    Answers from memory are not backbone queries, so ``exposure`` does not count them; ``tokenize`` of a
    string already seen is answered from memory too, so over a server a remembered text is not sent again.
    """

    def __init__(self, handle: Handle, max_mb: float = 512.0) -> None:
        if handle.access is AccessLevel.WHITE_BOX:
            raise InvalidInputError("memoize: received a white-box handle; its module can change in place, so a "
                                    "remembered output may be stale. Memoize a black-box, dark-gray or "
                                    "light-gray handle")
        if isinstance(max_mb, bool) or not isinstance(max_mb, (int, float)) or not (0 < max_mb < math.inf):
            raise InvalidInputError(f"memoize: max_mb must be a finite number of MiB above 0, got {max_mb!r}; "
                                    "pass e.g. max_mb=256")
        self.handle, self.max_bytes = handle, int(max_mb * 2**20)
        self.access, self.spec, self.exposure, self.device = handle.access, handle.spec, handle.exposure, handle.device
        self._memory: OrderedDict[tuple[str, bytes], tuple[object, int]] = OrderedDict()  # LRU, with costs
        self._pads: dict[str, set[int]] = {}  # input name -> trailing padding values the backbone has accepted
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = 0

    def __repr__(self) -> str:
        return f"MemoHandle({self.handle!r}, entries={len(self._memory)}, hits={self.hits}, misses={self.misses})"

    @property
    def grants(self) -> frozenset[str]:
        return self.handle.grants

    @property
    def top_k_grant(self) -> int:
        return self.handle.top_k_grant

    @property
    def fingerprint(self) -> str:
        return self.handle.fingerprint

    def forward(self, inputs: Mapping[str, Tensor | Sequence[str]], *, add: Mapping[str, Tensor] | None = None,
                insert: Mapping[str, Tensor] | None = None, outputs: Sequence[str] | None = None,
                reads: Sequence[str] = (), top_k: int = 0) -> dict[str, Tensor]:
        """As ``Handle.forward``; plain requests naming their ``outputs`` are answered row by row from memory."""
        rows = None if add or insert or reads or top_k or not outputs else split_rows(inputs)
        if rows is None:
            return self.handle.forward(inputs, add=add, insert=insert, outputs=outputs, reads=reads, top_k=top_k)
        found: dict[int, list[Tensor]] = {}
        with self._lock:
            for i, (key, tails) in enumerate(rows):
                recalled = [self._get(f"row:{port}", key) for port in outputs] if self._knows(tails) else [None]
                if all(r is not None for r in recalled):
                    found[i] = recalled  # type: ignore[assignment]
        distinct = [key + repr(sorted(tails.items())).encode() for key, tails in rows]  # padding values included
        first: dict[bytes, int] = {}  # one backbone row per distinct input not found
        for i, d in enumerate(distinct):
            if i not in found:
                first.setdefault(d, i)
        fresh: dict[str, Tensor] = {}
        if first:
            sent = list(first.values())
            fresh = self.handle.forward(inputs if len(sent) == len(rows) else take_rows(inputs, sent), outputs=outputs)
            with self._lock:
                for j, i in enumerate(sent):
                    self._learn(rows[i][1])
                    for port in outputs:
                        row = fresh[port][j].detach()
                        self._put(f"row:{port}", rows[i][0], row.clone(), row.numel() * row.element_size())
        where = next(iter(fresh.values())).device if fresh else _client_device(inputs, self.device)
        position = {d: j for j, d in enumerate(first)}
        out = {port: torch.stack([found[i][k].to(where) if i in found else fresh[port][position[distinct[i]]]
                                  for i in range(len(rows))])
               for k, port in enumerate(outputs)}
        with self._lock:
            self.misses += len(first)
            self.hits += len(rows) - len(first)
        return out

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """As the handle's; strings tokenized before are right-padded from memory with accepted padding values."""
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            return self.handle.tokenize(texts)
        with self._lock:
            known = [self._get("text", t.encode()) for t in texts]
            padded = _pad(known, self._pads) if all(k is not None for k in known) else None  # type: ignore[arg-type]
        if padded is not None:
            return padded
        batch = self.handle.tokenize(texts)
        with self._lock:
            for _, tails in split_rows(batch) or []:
                self._learn(tails)
            for i, text in enumerate(texts):
                row = _unpadded(batch, i)
                if row is not None:
                    self._put("text", text.encode(), row, sum(v.numel() * v.element_size() for v in row.values()))
        return batch

    def _knows(self, tails: Mapping[str, set[int]]) -> bool:
        return all(tail <= self._pads.get(name, set()) for name, tail in tails.items())

    def _learn(self, tails: Mapping[str, set[int]]) -> None:
        for name, tail in tails.items():
            self._pads.setdefault(name, set()).update(tail)

    def _get(self, space: str, key: bytes) -> object | None:
        entry = self._memory.get((space, key))
        if entry is None:
            return None
        self._memory.move_to_end((space, key))
        return entry[0]

    def _put(self, space: str, key: bytes, payload: object, size: int) -> None:
        """Keep ``payload`` (``size`` bytes of values) as the most recent entry; drop the oldest past the bound."""
        cost = size + len(key) + ROW_OVERHEAD
        if cost > self.max_bytes:  # larger than the whole bound: returned, not kept
            return
        old = self._memory.pop((space, key), None)
        self.bytes += cost - (old[1] if old else 0)
        self._memory[(space, key)] = (payload, cost)
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._memory.popitem(last=False)
            self.bytes -= dropped

    def generate(self, inputs: Mapping[str, Tensor | Sequence[str]], **kwargs: Any) -> Any:
        """As the handle's: generations are never answered from memory (sampling, and every token a forward)."""
        return self.handle.generate(inputs, **kwargs)

    def generate_images(self, inputs: Mapping[str, Tensor | Sequence[str]], **kwargs: Any) -> Any:
        """As the handle's: images are never answered from memory (each request samples)."""
        return self.handle.generate_images(inputs, **kwargs)

    def encode_image(self, pixels: Tensor, **edits: Mapping[str, Tensor]) -> Tensor:
        """``[B, E]`` image embeddings, remembered when ``edits`` is empty."""
        return encode_image(self, pixels, **edits)

    def encode_text(self, text: Sequence[str] | Mapping[str, Tensor], **edits: Mapping[str, Tensor]) -> Tensor:
        """``[B, E]`` text embeddings for strings or tokenized ids, remembered when ``edits`` is empty."""
        return encode_text(self, text, **edits)

    def module(self) -> nn.Module:
        return self.handle.module()  # refused below white-box, and a memo never wraps white-box

    def with_module(self, module: nn.Module) -> Handle:
        return self.handle.with_module(module)


def split_rows(inputs: Mapping[str, Tensor | Sequence[str]]) -> list[tuple[bytes, dict[str, set[int]]]] | None:
    """Per input row: a digest of what decides its output, and the trailing padding values left out of it.

    None when the request cannot be remembered: an input that needs a gradient, one that is neither a tensor
    with a batch dimension nor a list of strings, or inputs that disagree on the batch size. ``[B, L]``
    tensors beside a ``<modality>.attention_mask`` keep their columns up to the row's last unmasked one.
    """
    digests: list[hashlib.blake2b] = []
    tails: list[dict[str, set[int]]] = []
    for name in sorted(inputs):
        value = inputs[name]
        if isinstance(value, Tensor):
            if value.requires_grad or value.dim() == 0:
                return None
            rows = _tensor_rows(name, value, inputs)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            rows = [(v.encode(), set()) for v in value]
        else:
            return None
        if not digests:
            digests = [hashlib.blake2b(digest_size=20) for _ in rows]
            tails = [{} for _ in rows]
        if len(rows) != len(digests):
            return None
        for digest, tail, (data, padding) in zip(digests, tails, rows):
            digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
            if padding:
                tail[name] = padding
    return [(d.digest(), t) for d, t in zip(digests, tails)] if digests else None


def _tensor_rows(name: str, value: Tensor, inputs: Mapping[str, Tensor | Sequence[str]]
                 ) -> list[tuple[bytes, set[int]]]:
    mask = inputs.get(f"{name.split('.')[0]}.attention_mask")
    flat = value.detach().cpu()
    head = f"{flat.dtype}".encode()
    if isinstance(mask, Tensor) and value.dim() == 2 and mask.shape == value.shape and not flat.is_floating_point():
        ends = _ends(mask)
        return [(head + _bytes(flat[i, :n]), set(flat[i, n:].tolist())) for i, n in enumerate(ends)]
    return [(head + str(tuple(flat.shape[1:])).encode() + _bytes(flat[i]), set()) for i in range(len(flat))]


def _ends(mask: Tensor) -> list[int]:
    """Per row, one past its last unmasked column (0 for a row with none)."""
    on = mask.detach().cpu().bool()
    last = on.shape[1] - on.flip(1).int().argmax(1)  # [B]
    return [int(n) if row.any() else 0 for n, row in zip(last, on)]


def _bytes(t: Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()  # any dtype, bf16 included


def _unpadded(batch: Mapping[str, Tensor], i: int) -> dict[str, Tensor] | None:
    """Row ``i`` of a tokenizer's output without its trailing padding; None if it is padded on the left."""
    masks = [v for k, v in batch.items() if k.endswith(".attention_mask")]
    if len(masks) != 1 or any(v.dim() != 2 or v.shape != masks[0].shape for v in batch.values()):
        return None
    row = masks[0][i].bool()
    n = _ends(masks[0][i:i + 1])[0]
    if not bool(row[:n].all()):
        return None
    return {k: v[i, :n].clone() for k, v in batch.items()}


def _pad(rows: list[dict[str, Tensor]], pads: Mapping[str, set[int]]) -> dict[str, Tensor] | None:
    """Right-pad remembered token rows to one length with the padding values the backbone accepted."""
    length = max(len(next(iter(r.values()))) for r in rows)
    out = {}
    for name in rows[0]:
        short = any(len(r[name]) < length for r in rows)
        accepted = pads.get(name, set())
        if short and len(accepted) != 1:
            return None  # no single padding value seen for this input yet: the handle tokenizes
        fill = next(iter(accepted)) if short else 0
        out[name] = torch.stack([torch.cat([r[name], r[name].new_full((length - len(r[name]),), fill)])
                                 for r in rows])
    return out


def _client_device(inputs: Mapping[str, Tensor | Sequence[str]], default: torch.device) -> torch.device:
    """Where results go, as the boundary decides: the first floating input's device, else the handle's."""
    return next((v.device for v in inputs.values() if isinstance(v, Tensor) and v.is_floating_point()), default)


def take_rows(inputs: Mapping[str, Tensor | Sequence[str]], rows: list[int]) -> dict[str, Tensor | Sequence[str]]:
    """The same request with only ``rows`` of every input."""
    index = torch.tensor(rows)
    return {name: value[index.to(value.device)] if isinstance(value, Tensor) else [value[i] for i in rows]
            for name, value in inputs.items()}
