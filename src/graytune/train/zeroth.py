"""Zeroth-order training: the gradient of adapter tensors estimated from loss values alone.

At black-box the boundary answers forward calls and never a gradient. Adapters whose
edits cross it (the DGA pixel conv, text shift and extra tokens, prompt tokens) are
then trained from the losses of perturbed copies of their tensors θ (``d`` numbers),
each loss one batched forward per tower, as the black-box prompt-tuning papers do:

- ``spsa``: Rademacher directions Δ ∈ {±1}^d, q per step,
  ĝ = mean_i (L(θ + εΔ_i) − L(θ − εΔ_i)) / 2ε · Δ_i;
- ``spsa-gc``: BlackVIP's SPSA with gradient correction, a Nesterov-style look-ahead
  momentum: m ← βm + ĝ (m = ĝ at the first step), and ĝ + βm is stepped;
- ``zip``: ZIP's clipped SPSA in a low-rank intrinsic space: θ = θ₀ + P z with a fixed
  random P ``[d, k]`` (entries N(0, 1/k), drawn from the run's seed), the directions
  perturb z ∈ R^k, and the estimate's norm is clipped to √k (ZIP's threshold);
- ``mezo``: MeZO's two-point estimator with Gaussian directions u ~ N(0, I).

A step costs 2q loss evaluations per batch; a loss evaluation sends the task's batched
forwards (classification: the class prompts and the queries, two calls). The estimate is
written into ``.grad`` of the tensors stepped (θ, or z for ``zip``), so the trainer's AdamW,
schedule, checkpoints and best-state selection step it as they step a gradient (the papers
step plain SGD with a decaying gain). Client-side tensors after the boundary (output adapters,
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

#: The estimators, with their defaults (BlackVIP and ZIP: q = 5, ε = 0.01; MeZO: q = 1, ε = 1e-3).
ESTIMATORS: dict[str, dict[str, Any]] = {
    "spsa": {"q": 5, "eps": 0.01},
    "spsa-gc": {"q": 5, "eps": 0.01, "momentum": 0.9},
    "zip": {"q": 5, "eps": 0.01, "dim": 256},
    "mezo": {"q": 1, "eps": 1e-3},
}
DEFAULT_ESTIMATOR = "spsa-gc"
#: ``TrainConfig`` fields that set zeroth-order training, and the setting each fills.
ZO_FIELDS = {"zo": "estimator", "zo_q": "q", "zo_eps": "eps", "zo_dim": "dim", "zo_momentum": "momentum"}


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
        eps: perturbation scale ε.
        dim: ``zip``: the intrinsic dimension k.
        momentum: ``spsa-gc``: the correction's β.
    """

    estimator: str
    q: int
    eps: float
    dim: int | None = None
    momentum: float | None = None

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


class ZerothOrder:
    """Gradient estimates for tensors that never ask the boundary for a gradient.

    Args:
        params: the tensors θ (``requires_grad`` off), e.g. ``zo_parameters(model)``.
        settings: the estimator.
        seed: the directions of step ``t`` are drawn from ``(seed, t)`` alone, so a resumed run
            draws the same ones (and ``zip``'s projection is drawn from ``seed``).
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
        self.z: Tensor | None = None
        if settings.estimator == "zip":
            k = int(settings.dim or 1)
            self.z = torch.zeros(k, device=self.device)  # [k]
            self.theta0 = self._flat().clone()  # [d]
            g = torch.Generator().manual_seed(_mix(seed, 0x51F))
            self.projection = (torch.randn(sum(self.sizes), k, generator=g) / math.sqrt(k)).to(self.device)  # [d, k]

    def variables(self) -> dict[str, Tensor]:
        """The tensors the optimizer steps: θ by name, or ``zip``'s intrinsic vector z."""
        return {"zeroth_order.z": self.z} if self.z is not None else dict(zip(self.names, self.params))

    def tensors(self) -> dict[str, Tensor]:
        """θ by name: what a checkpoint and the best state keep beside the model's trainable tensors."""
        return dict(zip(self.names, self.params))

    #: the settings that make a step cheaper, for a budget too small for one
    cost_flags = "--grad-accum or --zo-q"

    def step_cost(self, grad_accum: int) -> str:
        """What one training step costs in loss evaluations (for a budget too small for one)."""
        return (f"{2 * self.settings.q * grad_accum} loss evaluations (2 × zo_q × grad_accum), each the task's "
                "batched forwards")

    def accumulate(self, loss_of: Callable[[], Tensor], step: int, part: int = 0, parts: int = 1) -> float:
        """Add this batch's estimate / ``parts`` to the step's (2q calls of ``loss_of``); the mean loss / ``parts``.

        ``loss_of`` computes the loss at the current θ (a scalar tensor); a step accumulates ``parts``
        batches (``grad_accum``), this is batch ``part``. Client-side tensors that require gradients
        accumulate the gradient of the mean of the 2q losses / ``parts``. θ is restored exactly.
        """
        s = self.settings
        weight = 1.0 / parts
        base = [p.detach().clone() for p in self.params]
        estimate = torch.zeros(self.z.numel() if self.z is not None else sum(self.sizes), device=self.device)
        total = 0.0
        try:
            for i in range(s.q):
                v = self.direction(step, part, i)  # [n]
                delta = self.projection @ v if self.z is not None else v  # [d]
                values = []
                for sign in (1.0, -1.0):
                    self._put(base, sign * s.eps * delta)
                    loss = loss_of()
                    if loss.requires_grad:
                        (loss * (weight / (2 * s.q))).backward()
                    values.append(float(loss.detach()))
                estimate += (values[0] - values[1]) / (2 * s.eps) * v
                total += values[0] + values[1]
        finally:
            self._put(base, None)
        estimate *= weight / s.q
        self.pending = estimate if self.pending is None else self.pending + estimate
        return weight * total / (2 * s.q)

    def direction(self, step: int, part: int, i: int) -> Tensor:
        """``[n]`` the ``i``-th direction of batch ``part`` of step ``step`` (Rademacher, or Gaussian for mezo)."""
        g = torch.Generator().manual_seed(_mix(self.seed, step, part, i))
        n = self.z.numel() if self.z is not None else sum(self.sizes)
        if self.settings.estimator == "mezo":
            return torch.randn(n, generator=g).to(self.device)
        return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).float().to(self.device)

    def write_grads(self) -> None:
        """Put the step's estimate, corrected (spsa-gc) or clipped (zip), into ``.grad`` of ``variables()``."""
        g, self.pending = self.pending, None
        if g is None:
            return
        if self.settings.estimator == "spsa-gc":
            beta = float(self.settings.momentum or 0.0)
            self._next_momentum = g.clone() if self.momentum is None else beta * self.momentum + g
            g = g + beta * self._next_momentum
        if self.z is not None:
            limit = math.sqrt(self.z.numel())
            norm = float(g.norm())
            if norm > limit:
                g = g * (limit / norm)
            self.z.grad = g.clone()
            return
        for p, piece in zip(self.params, g.split(self.sizes)):
            p.grad = piece.view_as(p).clone()

    def discard(self) -> None:
        """Forget a step's estimate that will not be stepped (the step was cut short)."""
        self.pending = self._next_momentum = None

    def after_step(self) -> None:
        """The step was taken: spsa-gc keeps its new momentum; ``zip`` sets θ = θ₀ + P z from the moved z."""
        if self._next_momentum is not None:
            self.momentum, self._next_momentum = self._next_momentum, None
        if self.z is not None:
            self._put([self.theta0], self.projection @ self.z, flat=True)

    def state_dict(self) -> dict[str, Any]:
        return {"momentum": self.momentum, "z": self.z, "theta0": getattr(self, "theta0", None)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.momentum = None if state.get("momentum") is None else state["momentum"].to(self.device)
        if self.z is not None:
            with torch.no_grad():
                self.z.copy_(state["z"])
            self.theta0 = state["theta0"].to(self.device)
            self._put([self.theta0], self.projection @ self.z, flat=True)  # θ follows z

    def _flat(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

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
