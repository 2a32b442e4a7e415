"""The surrogates an audit distils: small students the attacker could train on its own machine.

- ``BagOfTokens`` (text): an embedding row per token id of the backbone's own tokenizer, a masked
  mean, and an MLP. Its pooled vector lives in the backbone's token-embedding coordinates, so a
  shift added there (``shift``) means the same for student and backbone, and their Jacobians at
  that shift can be matched.
- ``ConvStudent`` (image): four strided convolutions, global pooling and an MLP, on the same
  pixels the backbone receives; its Jacobian at the pixels is matched to the backbone's VJP.

Both learn from a ``Replay`` of the backbone's answers (reservoir-sampled within a memory budget).

Example:
    >>> student = BagOfTokens(vocab=30522, dim=384, out=384)
    >>> student((ids, mask)).shape                            # [B, 384]
    >>> out, vjp = outputs_and_vjp(student, (ids, mask), v)     # vjp [B, 384]: vᵀ J at a shared shift
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
Batch = tuple[Tensor, Tensor] | Tensor  # (ids [B, L], mask [B, L]) or pixels [B, 3, S, S]


class BagOfTokens(nn.Module):
    """``MLP(mean of token rows + shift) + linear skip``: a text student over the backbone's token ids.

    The token table (one row per id, ``[V, D]``) is a buffer updated by ``RowAdam``: a step touches
    only the rows of the ids in its batch, so a 30k-token table costs what the batch costs.
    """

    def __init__(self, vocab: int, dim: int, out: int, hidden: int = 768) -> None:
        super().__init__()
        self.register_buffer("table", 0.1 * torch.randn(vocab, dim))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))
        self.skip = nn.Linear(dim, out)
        self.touched: list[tuple[Tensor, Tensor]] = []  # (ids, their rows as a leaf) of the step in progress

    def pooled(self, batch: Batch) -> Tensor:
        ids, mask = batch  # type: ignore[misc]
        weights = mask.float() / mask.sum(1, keepdim=True).clamp_min(1)  # [B, L]: the mean over real tokens
        if self.training and torch.is_grad_enabled():
            unique, local = torch.unique(ids, return_inverse=True)
            rows = self.table[unique].requires_grad_(True)  # [U, D]
            self.touched.append((unique, rows))
            return F.embedding_bag(local, rows, per_sample_weights=weights, mode="sum")  # [B, D]
        return F.embedding_bag(ids, self.table, per_sample_weights=weights, mode="sum")

    def forward(self, batch: Batch, shift: Tensor | None = None) -> Tensor:
        h = self.pooled(batch)
        if shift is not None:  # [B, D], added to every real token as the backbone's add does
            h = h + shift
        return self.mlp(h) + self.skip(h)  # [B, E]


class RowAdam:
    """Adam on the rows of a ``BagOfTokens`` table that a step touched (lazy Adam, as ``SparseAdam``)."""

    def __init__(self, student: BagOfTokens, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999),
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

    def forward(self, batch: Batch, shift: Tensor | None = None) -> Tensor:
        return self.net(batch)  # type: ignore[arg-type]


def outputs_and_vjp(student: nn.Module, batch: Batch, v: Tensor, create_graph: bool = False
                    ) -> tuple[Tensor, Tensor]:
    """The student's outputs ``[B, E]`` and ``vᵀ J`` at its input, from one forward: at a shift of the pooled
    tokens (``[B, D]``, text) or at the pixels (``[B, 3, S, S]``)."""
    if isinstance(batch, tuple):
        at = torch.zeros(batch[0].shape[0], student.skip.in_features, requires_grad=True)  # type: ignore[union-attr]
        out = student(batch, shift=at)
    else:
        at = batch.detach().requires_grad_(True)
        out = student(at)
    (grad,) = torch.autograd.grad((out * v).sum(), at, create_graph=create_graph)
    return out, grad


class Replay:
    """The backbone's answers an attack collected, at most ``capacity`` rows (reservoir sampling).

    Stored column by column in tensors allocated on the first ``add``: each column holds one
    row per sample (the input, the output and, when the call had a VJP, the output gradient sent
    and the input gradient that came back), so a minibatch is one index per column.
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
    return F.mse_loss(pred, target, reduction="sum") / target.pow(2).sum().clamp_min(1e-12)
