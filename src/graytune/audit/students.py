"""The surrogates an audit distils: small students the attacker could train on its own machine.

- ``AttentiveBag`` (text): an embedding row per token id of the backbone's own tokenizer, a position
  row, one self-attention layer, a masked mean and an MLP. Its token rows live in the
  backbone's token-embedding coordinates, so an edit added there (``edit``, ``[B, L, D]``) means the
  same for student and backbone: their per-token Jacobians can be matched, and through the attention
  layer they may differ by position and context, as a transformer's do.
- ``ConvStudent`` (image): four strided convolutions, global pooling and an MLP, on the same
  pixels the backbone receives; its Jacobian at the pixels is matched to the backbone's.

Both learn from ``Replay``s of the backbone's answers (reservoir-sampled within a memory budget): the
outputs, and the derivatives an attack collected: slopes along edits (``secant``, black-box finite
differences) or vector–Jacobian products (``vjp``, dark-gray and up).

Example:
    >>> student = AttentiveBag(vocab=30522, dim=384, out=384, positions=128)
    >>> student((ids, mask)).shape                             # [B, 384]
    >>> vjp(student, (ids, mask), v, width=48).shape            # [B, 48, 384]: vᵀ J per token
    >>> student_size(student)["total"]                           # the token table included
"""

from __future__ import annotations

import random
import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
Batch = tuple[Tensor, Tensor] | Tensor  # (ids [B, L], mask [B, L]) or pixels [B, 3, S, S]


class AttentiveBag(nn.Module):
    """``MLP(masked mean of (x + attention(x))) + linear skip``, ``x = token row + edit + position``.

    The token table (one row per id, ``[V, D]``) is a buffer updated by ``RowAdam``: a step touches
    only the rows of the ids in its batch, so a 30k-token table costs what the batch costs. Positions
    and the attention's value projection start at zero, so an untrained student is the bag of token
    rows the audit used before (``MLP(mean of token rows) + skip``), and it learns from there.
    """

    def __init__(self, vocab: int, dim: int, out: int, positions: int = 128, hidden: int = 768,
                 key: int = 64) -> None:
        super().__init__()
        self.register_buffer("table", 0.1 * torch.randn(vocab, dim))
        self.position = nn.Parameter(torch.zeros(positions, dim))
        self.query, self.key, self.value = nn.Linear(dim, key), nn.Linear(dim, key), nn.Linear(dim, dim)
        nn.init.zeros_(self.value.weight)
        nn.init.zeros_(self.value.bias)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))
        self.skip = nn.Linear(dim, out)
        self.touched: list[tuple[Tensor, Tensor]] = []  # (ids, their rows as a leaf) of the step in progress

    def rows(self, ids: Tensor) -> Tensor:
        """The token rows ``[B, L, D]`` of ``ids``; while training, a leaf per step for ``RowAdam``."""
        if self.training and torch.is_grad_enabled():
            unique, local = torch.unique(ids, return_inverse=True)
            rows = self.table[unique].requires_grad_(True)  # [U, D]
            self.touched.append((unique, rows))
            return rows[local]
        return self.table[ids]

    def forward(self, batch: Batch, edit: Tensor | None = None) -> Tensor:
        """Outputs ``[B, E]``; ``edit`` ``[B, L_e, D]`` is added to the first ``L_e`` token rows (the rest: none)."""
        ids, mask = batch  # type: ignore[misc]
        x = self.rows(ids)  # [B, L, D]
        if edit is not None:
            x = x + _fit(edit, ids.shape[1])
        x = x + self.position[:ids.shape[1]]
        scores = self.query(x) @ self.key(x).transpose(1, 2) / self.query.out_features ** 0.5  # [B, L, L]
        scores = scores.masked_fill(mask[:, None, :] == 0, -1e4)
        h = x + scores.softmax(-1) @ self.value(x)
        weights = mask.float() / mask.sum(1, keepdim=True).clamp_min(1)  # [B, L]: the mean over real tokens
        pooled = (h * weights.unsqueeze(-1)).sum(1)  # [B, D]
        return self.mlp(pooled) + self.skip(pooled)  # [B, E]


def _fit(edit: Tensor, length: int) -> Tensor:
    """``edit [B, L_e, D]`` cut or zero-padded to ``length`` positions (past a row's tokens the backbone's
    derivative is zero, so a cut loses nothing)."""
    if edit.shape[1] >= length:
        return edit[:, :length]
    return F.pad(edit, (0, 0, 0, length - edit.shape[1]))


class RowAdam:
    """Adam on the rows of an ``AttentiveBag`` table that a step touched (lazy Adam, as ``SparseAdam``)."""

    def __init__(self, student: AttentiveBag, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.student, self.lr, self.betas, self.eps = student, lr, betas, eps
        self.m, self.v = torch.zeros_like(student.table), torch.zeros_like(student.table)
        self.t = 0

    def zero_grad(self) -> None:
        self.student.touched.clear()

    @torch.no_grad()
    def step(self) -> None:
        touched = [(ids, rows.grad) for ids, rows in self.student.touched if rows.grad is not None]
        self.student.touched.clear()
        if not touched:
            return
        ids, inverse = torch.unique(torch.cat([i for i, _ in touched]), return_inverse=True)
        grad = torch.zeros(len(ids), self.m.shape[1]).index_add_(0, inverse, torch.cat([g for _, g in touched]))
        self.t += 1
        b1, b2 = self.betas
        m = self.m[ids].mul_(b1).add_(grad, alpha=1 - b1)
        v = self.v[ids].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        self.m[ids], self.v[ids] = m, v
        self.student.table[ids] -= self.lr * (m / (1 - b1**self.t)) / ((v / (1 - b2**self.t)).sqrt() + self.eps)


class ConvStudent(nn.Module):
    """A small conv net on ``[B, 3, S, S]`` pixels: four strided 3x3 convolutions, pooling and an MLP."""

    def __init__(self, out: int, width: int = 32) -> None:
        super().__init__()
        c = width
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 3, 2, 1), nn.GELU(), nn.Conv2d(c, 2 * c, 3, 2, 1), nn.GELU(),
            nn.Conv2d(2 * c, 4 * c, 3, 2, 1), nn.GELU(), nn.Conv2d(4 * c, 4 * c, 3, 2, 1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, 512), nn.GELU(), nn.Linear(512, out))

    def forward(self, batch: Batch, edit: Tensor | None = None) -> Tensor:
        pixels = batch if edit is None else batch + edit  # type: ignore[operator]
        return self.net(pixels)


def student_size(student: nn.Module) -> dict[str, int]:
    """The numbers a student holds: ``total`` (parameters and buffers: a text student's token table is a buffer
    that ``RowAdam`` trains), ``token_table`` and ``parameters`` (what ``torch.optim.Adam`` trains)."""
    table = getattr(student, "table", None)
    parameters = sum(p.numel() for p in student.parameters())
    buffers = sum(b.numel() for b in student.buffers())
    return {"total": parameters + buffers, "token_table": table.numel() if table is not None else 0,
            "parameters": parameters}


def vjp(student: nn.Module, batch: Batch, v: Tensor, width: int = 0, create_graph: bool = False) -> Tensor:
    """The student's ``vᵀ J`` for cotangents ``v [B, E]`` at its input: per token ``[B, width, D]`` (text, the
    first ``width`` positions) or per pixel ``[B, 3, S, S]`` (images), as the backbone's VJP comes back."""
    if isinstance(batch, tuple):
        at = torch.zeros(batch[0].shape[0], width, student.skip.in_features,  # type: ignore[union-attr]
                         requires_grad=True)
    else:
        at = torch.zeros_like(batch, requires_grad=True)  # type: ignore[arg-type]
    out = student(batch, edit=at)
    (grad,) = torch.autograd.grad((out * v).sum(), at, create_graph=create_graph)
    return grad


def secant(student: nn.Module, batch: Batch, direction: Tensor, epsilon: float) -> Tensor:
    """``(f(x + ε u) − f(x)) / ε`` ``[B, E]``: the student's slope along the edits ``direction`` (``u``) that the
    backbone's finite differences were taken along, at the same ``ε``."""
    return (student(batch, edit=epsilon * direction) - student(batch)) / epsilon


class Replay:
    """The backbone's answers an attack collected, at most ``capacity`` rows (reservoir sampling).

    Stored column by column in tensors allocated on the first ``add``: each column holds one row per
    sample (the input, the output, or a derivative and what it was taken along), so a minibatch is one
    index per column. Columns keep the dtype they arrive in (a large derivative may come half-precision).
    """

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity, self.rng = capacity, random.Random(seed)
        self.seen = self.size = 0
        self.columns: list[Tensor] = []
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    def add(self, *columns: Tensor) -> None:
        """One call's answers: tensors of the same trailing shapes every call, one row per sample along dim 0."""
        if not self.columns:
            self.columns = [torch.empty(self.capacity, *c.shape[1:], dtype=c.dtype) for c in columns]
        rows, slots = [], []
        for row in range(len(columns[0])):
            self.seen += 1
            if self.size < self.capacity:
                rows.append(row)
                slots.append(self.size)
                self.size += 1
            else:
                at = self.rng.randrange(self.seen)
                if at < self.capacity:
                    rows.append(row)
                    slots.append(at)
        if rows:
            index, where = torch.tensor(rows), torch.tensor(slots)
            for store, column in zip(self.columns, columns):
                store[where] = column.detach()[index].to(store.dtype)

    def sample(self, size: int) -> list[Tensor]:
        """A minibatch: each column at the same ``size`` random rows (with replacement)."""
        index = torch.randint(self.size, (size,), generator=self._generator)
        return [store[index] for store in self.columns]


def relative_mse(pred: Tensor, target: Tensor) -> Tensor:
    """``‖pred − target‖² / ‖target‖²`` over the batch (scale-free)."""
    target = target.float()
    return F.mse_loss(pred, target, reduction="sum") / target.pow(2).sum().clamp_min(1e-12)
