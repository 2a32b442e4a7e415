"""Zeroth-order training: the gradient of adapter tensors estimated from loss values alone.

At black-box the boundary answers forward calls and never a gradient. Adapters whose
edits cross it (the DGA pixel conv, text shift and extra tokens, prompt tokens) are
then trained from the losses of perturbed copies of their tensors θ (``d`` numbers),
each loss one model evaluation (one batched forward per tower the task uses):

- ``spsa``: Rademacher directions Δ ∈ {±1}^d, q per step,
  ĝ = mean_i (L(θ + εΔ_i) − L(θ − εΔ_i)) / 2ε · Δ_i;
- ``spsa-gc``: BlackVIP's SPSA with gradient correction, a Nesterov-style look-ahead
  momentum: m ← βm + ĝ (m = ĝ at the first step), and ĝ + βm is stepped;
- ``zip``: ZIP (Park et al., ICLR 2025; ``trainers/zip.py``): SPSA on the variables w of a low-rank,
  feature-shared reparametrisation (``IntrinsicSpace``): θ's rows are θ₀'s plus Fastfood projections of the
  rows of U·diag(s)·Vᵀ + 1·shared_vᵀ (intrinsic dimension k = ``dim``, rank r = 5), so n = R·r + r + (k/R)·r + k/R
  variables train for R rows (ZIP's 8 context tokens, k = 500: 417); directions are ZIP's segmented uniform
  (each coordinate ±U[0.5, 1]), ĝ_j = (L₊ − L₋) / (2ε_t Δ_j), the scale decays as ε_t = ε / t^0.1 (t = step + 1),
  and the estimate's norm is clipped to √n;
- ``mezo``: MeZO's two-point estimator with Gaussian directions u ~ N(0, I).

Where they differ from their papers (``graytune methods`` and docs/results.md say the same):

- every estimator's estimate goes into ``.grad`` and the trainer's AdamW with warm-up and cosine steps it;
  BlackVIP and ZIP step plain SGD with the gain a_t = 0.01 / (t + 1)^0.4, MeZO plain SGD;
- ``spsa``/``spsa-gc`` draw Rademacher directions at a fixed ε; BlackVIP draws segmented-uniform ones and
  decays ε as ZIP does;
- ``zip``'s rows: each token of a ``[1, K, D]`` tensor is one row, as ZIP's context tokens are; any other
  tensor (the pixel conv's weight, its bias) is one row of its numbers; the Fastfood transform pads to
  the power of two above both widths (ZIP's pads the intrinsic row, which must be the narrower);
- calls: ZIP and BlackVIP count one call per model evaluation (both towers); the boundary counts one per
  tower forward, twice as many on a two-tower task: ``graytune.train.budget`` keeps both.

A step costs 2q loss evaluations per batch. The estimate is written into ``.grad`` of the
tensors stepped (θ, or w for ``zip``), so the trainer's AdamW, schedule, checkpoints and best-state
selection step it as they step a gradient. Client-side tensors after the boundary (output adapters,
the temperature) get ordinary backprop gradients of the mean perturbed loss, at no extra call;
the zeroth-order tensors never ask for a gradient, so the boundary is never asked for a VJP.

Example:
    >>> zo = ZerothOrder(zo_parameters(model), ZOSettings.resolve("spsa-gc"), seed=0)
    >>> opt = torch.optim.AdamW([*client_params, *zo.variables().values()], lr=1e-2)
    >>> loss = zo.accumulate(lambda: task.loss(model, batch), step=0)   # 2q loss evaluations
    >>> zo.write_grads(); opt.step(); zo.after_step()

It is one of the trainer's two gradient sources (``graytune.train.gradients``), beside backprop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from graytune.errors import InvalidInputError

Tensor = torch.Tensor

#: The estimators, with their defaults (BlackVIP and ZIP: q = 5, ε = 0.01; ZIP: k = 500, r = 5, ε_t = ε / t^0.1;
#: MeZO: q = 1, ε = 1e-3).
ESTIMATORS: dict[str, dict[str, Any]] = {
    "spsa": {"q": 5, "eps": 0.01},
    "spsa-gc": {"q": 5, "eps": 0.01, "momentum": 0.9},
    "zip": {"q": 5, "eps": 0.01, "dim": 500, "rank": 5, "eps_decay": 0.1},
    "mezo": {"q": 1, "eps": 1e-3},
}
DEFAULT_ESTIMATOR = "spsa-gc"
#: ``TrainConfig`` fields that set zeroth-order training, and the setting each fills.
ZO_FIELDS = {"zo": "estimator", "zo_q": "q", "zo_eps": "eps", "zo_dim": "dim", "zo_momentum": "momentum"}
#: What a ``zip`` checkpoint's source state holds (``ZerothOrder.state_dict``), and what the earlier one held.
ZIP_STATE, OLD_ZIP_STATE = "zip-lowrank-1", ("z", "theta0")


def settings_problems(estimator: str | None, dim: int | None, momentum: float | None) -> list[str]:
    """What is wrong with a choice of estimator and its own settings ("" for nothing)."""
    name = estimator or DEFAULT_ESTIMATOR
    if name not in ESTIMATORS:
        import difflib

        close = difflib.get_close_matches(name, ESTIMATORS, n=1)
        return [f"zo must be one of {', '.join(ESTIMATORS)}; got {name!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "")]
    problems = []
    if dim is not None and name != "zip":
        problems.append(f"zo_dim (the intrinsic dimension) is for zo=zip; zo is {name}")
    if momentum is not None and name != "spsa-gc":
        problems.append(f"zo_momentum (the gradient correction) is for zo=spsa-gc; zo is {name}")
    return problems


@dataclass(frozen=True)
class ZOSettings:
    """One estimator with every setting resolved (see the module docstring).

    Attributes:
        estimator: ``spsa``, ``spsa-gc``, ``zip`` or ``mezo``.
        q: directions per step (each two loss evaluations).
        eps: perturbation scale ε (``zip``: at the first step).
        dim: ``zip``: the intrinsic dimension k.
        momentum: ``spsa-gc``: the correction's β.
        rank: ``zip``: the rank r of U·diag(s)·Vᵀ (ZIP's 5; no flag sets it).
        eps_decay: ε_t = ε / t^eps_decay at step t = step + 1 (``zip``: ZIP's 0.1; others 0, a fixed ε).
    """

    estimator: str
    q: int
    eps: float
    dim: int | None = None
    momentum: float | None = None
    rank: int | None = None
    eps_decay: float = 0.0

    @classmethod
    def resolve(cls, estimator: str | None = None, q: int | None = None, eps: float | None = None,
                dim: int | None = None, momentum: float | None = None) -> ZOSettings:
        """The settings given, the estimator's defaults for the rest; ``InvalidInputError`` for a bad mix."""
        problems = settings_problems(estimator, dim, momentum)
        if problems:
            raise InvalidInputError("zeroth-order settings refused: " + "; ".join(problems))
        name = estimator or DEFAULT_ESTIMATOR
        given = {k: v for k, v in {"q": q, "eps": eps, "dim": dim, "momentum": momentum}.items() if v is not None}
        return cls(name, **{**ESTIMATORS[name], **given})

    def fields(self) -> dict[str, Any]:
        """The ``TrainConfig`` fields that say these settings (what an artifact records)."""
        return {"zo": self.estimator, "zo_q": self.q, "zo_eps": self.eps, "zo_dim": self.dim,
                "zo_momentum": self.momentum}

    def eps_at(self, step: int) -> float:
        """ε at optimizer step ``step`` (0-based): ε / (step + 1)^eps_decay."""
        return self.eps / (step + 1) ** self.eps_decay


class IntrinsicSpace:
    """ZIP's low-rank, feature-shared reparametrisation of tensors θ: θ = θ₀ + offset(w).

    θ is cut into R rows (each token of a ``[1, K, D]`` tensor, or a whole other tensor). With m = k // R,
    the rows of U·diag(s)·Vᵀ + 1·shared_vᵀ (U ``[R, r]`` zeros, s ``[r]`` ones, V ``[m, r]`` ~ N(0, 1),
    shared_v ``[m]`` zeros: the offset is 0 at the start) are the rows' intrinsic vectors, each mapped to its
    row's width by its own Fastfood transform H·G·Π·H·B (Le et al. 2013), scaled to keep norms. w is
    (U, s, V, shared_v) flattened: ``size`` = R·r + r + m·r + m numbers.

    Args:
        shapes: the tensors' shapes, in order.
        dim: k. rank: r. seed: draws V and each row's Fastfood (B, Π, G).

    Raises:
        InvalidInputError: k below the number of rows.
    """

    def __init__(self, shapes: Sequence[torch.Size], dim: int, rank: int, seed: int = 0) -> None:
        self.widths = _row_widths(shapes)
        rows = len(self.widths)
        if dim < rows:
            raise InvalidInputError(f"zo_dim={dim} is below the {rows} rows zip reparametrises (one per token, one per "
                                    f"other tensor); give --zo-dim {rows} or more (ZIP's: 500)")
        self.rows, self.rank, self.per_row = rows, rank, dim // rows
        g = torch.Generator().manual_seed(_mix(seed, 0x51F))
        v = torch.randn(self.per_row, rank, generator=g)
        self.initial = torch.cat([torch.zeros(rows * rank), torch.ones(rank), v.reshape(-1), torch.zeros(self.per_row)])
        self.maps = [fastfood(width, self.per_row, _mix(seed, 0x51F, i)) for i, width in enumerate(self.widths)]

    @property
    def size(self) -> int:
        """n, the number of variables: R·r + r + m·r + m (ZIP's count)."""
        return self.rows * self.rank + self.rank + self.per_row * self.rank + self.per_row

    def offset(self, w: Tensor) -> Tensor:
        """``[d]`` θ − θ₀ for the variables ``w`` ``[n]`` (differentiable)."""
        r, rows, m = self.rank, self.rows, self.per_row
        u, s = w[:rows * r].view(rows, r), w[rows * r:rows * r + r]
        v, shared = w[rows * r + r:rows * r + r + m * r].view(m, r), w[-m:]
        intrinsic = (u * s) @ v.T + shared  # [R, m]
        return torch.cat([p.to(w.device) @ z for p, z in zip(self.maps, intrinsic)])


def _row_widths(shapes: Sequence[torch.Size]) -> list[int]:
    """Each row's width: a ``[1, K, D]`` tensor gives K rows of D; any other tensor one row of its numbers."""
    widths: list[int] = []
    for shape in shapes:
        tokens = len(shape) == 3 and shape[0] == 1
        widths += [int(shape[2])] * int(shape[1]) if tokens else [int(torch.Size(shape).numel())]
    return widths


def fastfood(width: int, dim: int, seed: int) -> Tensor:
    """``[width, dim]`` the Fastfood map H·G·Π·H·B of a ``dim`` vector, padded to L = 2^⌈log₂ max(width, dim)⌉, its
    first ``width`` outputs, divided by √(L·ΣG²)·√(width / L) (ZIP's scale: norms kept on average); written out
    as a matrix (the same linear map as the fast transform)."""
    size = 1 << (max(width, dim) - 1).bit_length()
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (size,), generator=g).float() * 2 - 1  # B
    order = torch.randperm(size, generator=g)  # Π
    gauss = torch.randn(size, generator=g)  # G
    x = signs[:, None] * torch.eye(size, dim)  # B, on the padded basis vectors: [L, dim]
    x = walsh_hadamard(gauss[:, None] * walsh_hadamard(x)[order])[:width]
    return x / (math.sqrt(size * float(gauss.pow(2).sum())) * math.sqrt(width / size))


def walsh_hadamard(x: Tensor) -> Tensor:
    """``H x`` for ``x`` ``[L, c]``, H the unnormalised Walsh–Hadamard matrix of Sylvester's order (L a power of
    two), by butterflies: L·log₂L·c additions, no L × L matrix."""
    n, h = x.shape[0], 1
    while h < n:
        blocks = x.reshape(n // (2 * h), 2, h, -1)
        x = torch.stack([blocks[:, 0] + blocks[:, 1], blocks[:, 0] - blocks[:, 1]], dim=1).reshape(n, -1)
        h *= 2
    return x


class ZerothOrder:
    """Gradient estimates for tensors that never ask the boundary for a gradient.

    Args:
        params: the tensors θ (``requires_grad`` off), e.g. ``zo_parameters(model)``.
        settings: the estimator.
        seed: the directions of step ``t`` are drawn from ``(seed, t)`` alone, so a resumed run
            draws the same ones (and ``zip``'s reparametrisation is drawn from ``seed``).
    """

    def __init__(self, params: Mapping[str, Tensor], settings: ZOSettings, seed: int = 0) -> None:
        if not params:
            raise InvalidInputError("zeroth-order training needs at least one tensor to train")
        asking = [n for n, p in params.items() if p.requires_grad]
        if asking:
            raise InvalidInputError(f"tensors {asking[:3]} require gradients, so every forward would ask the boundary "
                                    "for one; zeroth-order tensors must have requires_grad off")
        self.names, self.params = list(params), list(params.values())
        self.settings, self.seed = settings, seed
        self.sizes = [p.numel() for p in self.params]
        self.device = self.params[0].device
        self.pending: Tensor | None = None  # [n] the step's estimate so far, in the space stepped
        self.momentum: Tensor | None = None  # spsa-gc's m, as of the last step taken
        self._next_momentum: Tensor | None = None  # m once the step being taken is taken
        self.space: IntrinsicSpace | None = None
        self.w: Tensor | None = None
        if settings.estimator == "zip":
            self.space = IntrinsicSpace([p.shape for p in self.params], int(settings.dim or 1),
                                        int(settings.rank or 1), seed)
            self.space.maps = [m.to(self.device) for m in self.space.maps]
            self.w = self.space.initial.clone().to(self.device)  # [n]
            self.theta0 = self._flat().clone()  # [d]

    def variables(self) -> dict[str, Tensor]:
        """The tensors the optimizer steps: θ by name, or ``zip``'s variables w (U, s, V, shared_v flattened)."""
        return {"zeroth_order.w": self.w} if self.w is not None else dict(zip(self.names, self.params))

    def tensors(self) -> dict[str, Tensor]:
        """θ by name: what a checkpoint and the best state keep beside the model's trainable tensors."""
        return dict(zip(self.names, self.params))

    #: the settings that make a step cheaper, for a budget too small for one
    cost_flags = "--grad-accum or --zo-q"

    def step_cost(self, grad_accum: int) -> str:
        """What one training step costs in loss evaluations (for a budget too small for one)."""
        return (f"{2 * self.settings.q * grad_accum} loss evaluations (2 × zo_q × grad_accum), each the task's "
                "batched forwards")

    def evaluations_per_batch(self) -> int:
        """Loss evaluations (model evaluations) one batch of a step costs: 2q."""
        return 2 * self.settings.q

    def accumulate(self, loss_of: Callable[[], Tensor], step: int, part: int = 0, parts: int = 1) -> float:
        """Add this batch's estimate / ``parts`` to the step's (2q calls of ``loss_of``); the mean loss / ``parts``.

        ``loss_of`` computes the loss at the current θ (a scalar tensor); a step accumulates ``parts``
        batches (``grad_accum``), this is batch ``part``. Client-side tensors that require gradients
        accumulate the gradient of the mean of the 2q losses / ``parts``. θ is restored exactly.
        """
        s = self.settings
        weight, eps = 1.0 / parts, s.eps_at(step)
        base = [p.detach().clone() for p in self.params]
        estimate = torch.zeros(self.w.numel() if self.w is not None else sum(self.sizes), device=self.device)
        total = 0.0
        try:
            for i in range(s.q):
                v = self.direction(step, part, i)  # [n]
                values = []
                for sign in (1.0, -1.0):
                    self._perturb(base, sign * eps * v)
                    loss = loss_of()
                    if loss.requires_grad:
                        (loss * (weight / (2 * s.q))).backward()
                    values.append(float(loss.detach()))
                slope = (values[0] - values[1]) / (2 * eps)
                estimate += slope / v if self.w is not None else slope * v  # ZIP divides by Δ (Spall's form)
                total += values[0] + values[1]
        finally:
            self._put(base, None)
        estimate *= weight / s.q
        self.pending = estimate if self.pending is None else self.pending + estimate
        return weight * total / (2 * s.q)

    def direction(self, step: int, part: int, i: int) -> Tensor:
        """``[n]`` the ``i``-th direction of batch ``part`` of step ``step``: Rademacher, Gaussian (mezo) or
        ZIP's segmented uniform (zip: each coordinate's size uniform in [0.5, 1], its sign ±1)."""
        g = torch.Generator().manual_seed(_mix(self.seed, step, part, i))
        n = self.w.numel() if self.w is not None else sum(self.sizes)
        if self.settings.estimator == "mezo":
            return torch.randn(n, generator=g).to(self.device)
        signs = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).float()
        if self.w is not None:
            return (signs * (0.5 + 0.5 * torch.rand(n, generator=g))).to(self.device)
        return signs.to(self.device)

    def write_grads(self) -> None:
        """Put the step's estimate, corrected (spsa-gc) or clipped to √n (zip), into ``.grad`` of ``variables()``."""
        g, self.pending = self.pending, None
        if g is None:
            return
        if self.settings.estimator == "spsa-gc":
            beta = float(self.settings.momentum or 0.0)
            self._next_momentum = g.clone() if self.momentum is None else beta * self.momentum + g
            g = g + beta * self._next_momentum
        if self.w is not None:
            limit = math.sqrt(self.w.numel())
            norm = float(g.norm())
            if norm >= limit:
                g = g * (limit / norm)
            self.w.grad = g.clone()
            return
        for p, piece in zip(self.params, g.split(self.sizes)):
            p.grad = piece.view_as(p).clone()

    def discard(self) -> None:
        """Forget a step's estimate that will not be stepped (the step was cut short)."""
        self.pending = self._next_momentum = None

    def after_step(self) -> None:
        """The step was taken: spsa-gc keeps its new momentum; ``zip`` sets θ = θ₀ + offset(w) from the moved w."""
        if self._next_momentum is not None:
            self.momentum, self._next_momentum = self._next_momentum, None
        if self.w is not None:
            self._perturb([], None)

    def state_dict(self) -> dict[str, Any]:
        if self.w is None:
            return {"momentum": self.momentum}
        return {"momentum": self.momentum, "space": ZIP_STATE, "w": self.w, "theta0": self.theta0}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The state ``state_dict`` wrote; a ``zip`` checkpoint of graytune's earlier dense projection is refused."""
        if self.w is not None and state.get("space") != ZIP_STATE:
            found = sorted(k for k, v in state.items() if v is not None)
            earlier = all(k in state for k in OLD_ZIP_STATE)
            raise InvalidInputError(
                f"this checkpoint's zip state holds {found}, not ZIP's low-rank variables ({ZIP_STATE}): "
                + ("it was written by graytune's earlier zip (θ = θ₀ + P z with a dense random P), which cannot "
                   "continue as ZIP's reparametrisation; " if earlier else "")
                + "delete the checkpoint to start the run over (its finished adapters, if any, still load)")
        self.momentum = None if state.get("momentum") is None else state["momentum"].to(self.device)
        if self.w is not None:
            with torch.no_grad():
                self.w.copy_(state["w"])
            self.theta0 = state["theta0"].to(self.device)
            self._perturb([], None)  # θ follows w

    def _flat(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def _perturb(self, base: Sequence[Tensor], offset: Tensor | None) -> None:
        """θ = base + offset (``[d]``); ``zip``: θ = θ₀ + offset_space(w + offset), ``offset`` ``[n]`` in w's space."""
        if self.space is None or self.w is None:
            self._put(base, offset)
            return
        with torch.no_grad():
            w = self.w if offset is None else self.w + offset
            self._put([self.theta0], self.space.offset(w), flat=True)

    @torch.no_grad()
    def _put(self, base: Sequence[Tensor], offset: Tensor | None, flat: bool = False) -> None:
        """θ = base (+ offset ``[d]``); ``flat``: ``base`` is one ``[d]`` vector."""
        pieces = base[0].split(self.sizes) if flat else base
        offsets = offset.split(self.sizes) if offset is not None else [None] * len(self.params)
        for p, b, o in zip(self.params, pieces, offsets):
            p.copy_(b.view_as(p) if o is None else b.view_as(p) + o.view_as(p))


def _mix(*numbers: int) -> int:
    """One 63-bit seed from several integers (deterministic across runs and machines)."""
    value = 0x9E3779B97F4A7C15
    for n in numbers:
        value = ((value ^ (int(n) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % 2**64
    return value % 2**63
