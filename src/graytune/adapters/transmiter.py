"""TransMiter's logit adapter (Park et al., AAAI 2026): forward-only, on class scores, black-box.

Per sample: standardise the M class scores, project with an orthogonal ``W``
(D×M), add a residual MLP (LayerNorm → Linear D→4D → GELU → Linear 4D→D, the
last layer zero so the adapter starts as the identity), project back with
``W``ᵀ's transpose, de-standardise; keep the first N (task) classes.

Moving it to another backbone changes only ``W`` (see ``graytune.transfer``).

Example:
    >>> adapter = TransMiterAdapter(TransMiterConfig(classes=1024, dim=1024))
    >>> adapter(scores)            # [B, M] -> [B, M]; scores[:, :N] are the task classes
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrizations

from graytune.adapters.declared import Declared
from graytune.errors import InvalidInputError
from graytune.registry import Registry
from graytune.types import AccessLevel

Tensor = torch.Tensor


@dataclass
class TransMiterConfig:
    classes: int = 1024
    """M: task plus auxiliary classes the scores cover."""
    dim: int = 1024
    """D: width of the latent space (D <= M; the authors use D = M)."""
    hidden_ratio: int = 4
    """The MLP's hidden width is ``hidden_ratio * D``."""


#: name -> logit adapter class (adapters on class scores, trained forward-only)
LOGIT_ADAPTERS: Registry = Registry("logit adapter")


@LOGIT_ADAPTERS.register("transmiter")
class TransMiterAdapter(nn.Module, Declared):
    """Standardise → orthogonal in-projection → residual MLP → out-projection → de-standardise."""

    port: ClassVar[str] = "logits"
    min_access = AccessLevel.BLACK_BOX
    config_class = TransMiterConfig
    port_patterns = ("logits",)
    trains = "an orthogonal projection and residual MLP on class scores"

    def __init__(self, config: TransMiterConfig) -> None:
        super().__init__()
        if not 1 <= config.dim <= config.classes:
            raise InvalidInputError(f"transmiter: need 1 <= dim <= classes, got dim={config.dim}, "
                                    f"classes={config.classes}")
        self.config = config
        self.projection = nn.Linear(config.classes, config.dim, bias=False)  # weight: W, [D, M]
        parametrizations.orthogonal(self.projection)  # rows stay orthonormal while W trains
        hidden = config.hidden_ratio * config.dim
        self.mlp = nn.Sequential(nn.LayerNorm(config.dim), nn.Linear(config.dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, config.dim))
        nn.init.zeros_(self.mlp[3].weight)  # the residual branch starts at zero: the identity when D = M
        nn.init.zeros_(self.mlp[3].bias)
        self._frozen_weight: Tensor | None = None

    @property
    def weight(self) -> Tensor:
        """The orthogonal ``W`` ([D, M], orthonormal rows); computed once while in eval mode."""
        if self.training or torch.is_grad_enabled():
            return self.projection.weight
        if self._frozen_weight is None:
            self._frozen_weight = self.projection.weight.detach()
        return self._frozen_weight

    def train(self, mode: bool = True) -> TransMiterAdapter:
        self._frozen_weight = None
        return super().train(mode)

    @staticmethod
    def standardise(scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample standardisation over the classes: ``(z̃, mean, std)``."""
        mean = scores.mean(dim=-1, keepdim=True)
        std = scores.std(dim=-1, keepdim=True)
        return (scores - mean) / (std + 1e-6), mean, std

    def latent(self, scores: Tensor) -> Tensor:
        """``z̃ Wᵀ``: the standardised scores in the latent space, ``[B, D]``."""
        z, _, _ = self.standardise(scores)
        return z @ self.weight.T

    def forward(self, scores: Tensor) -> Tensor:
        """``[B, M]`` class scores → adapted ``[B, M]`` scores."""
        if scores.dim() != 2 or scores.shape[1] != self.config.classes:
            raise InvalidInputError(f"transmiter: expected scores of shape [B, {self.config.classes}], got "
                                    f"{list(scores.shape)}; score the same class list the adapter was built for")
        z, mean, std = self.standardise(scores)
        weight = self.weight  # the orthogonal map of an [M, M] matrix costs O(M³): compute it once per forward
        h = z @ weight.T  # [B, D]
        h = h + self.mlp(h)
        return (h @ weight) * (std + 1e-6) + mean  # [B, M]

    def set_weight(self, weight: Tensor) -> None:
        """Replace ``W`` by another orthogonal ``[D, M]`` matrix (the transfer's basis change)."""
        if weight.shape != self.weight.shape:
            raise InvalidInputError(f"transmiter: W must have shape {list(self.weight.shape)}, got {list(weight.shape)}")
        with torch.no_grad():
            self.projection.weight = weight  # the parametrization maps it back onto the orthogonal manifold
        self._frozen_weight = None
