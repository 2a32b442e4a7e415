"""Output-only residual MLP (CLIP-Adapter style): ``(1 - mix) x + mix * MLP(x)``; black-box baseline.

The MLP's last layer starts at zero, so at init the output is ``(1 - mix) x``:
after L2 normalisation, the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from graytune.adapters.base import ADAPTERS, Adapter, port_dim
from graytune.errors import InvalidInputError
from graytune.types import AccessLevel, BackboneSpec


@dataclass
class OutputMLPConfig:
    reduction: int = 4
    """Hidden width is the embedding width divided by this."""
    mix: float = 0.2
    """Weight of the MLP branch in the residual mix (CLIP-Adapter uses 0.2)."""


@ADAPTERS.register("output-mlp")
class OutputMLP(Adapter):
    min_access = AccessLevel.BLACK_BOX
    config_class = OutputMLPConfig
    port_patterns = ("{m}.embeds",)
    trains = "a residual bottleneck MLP on the embedding"

    def __init__(self, config: OutputMLPConfig, spec: BackboneSpec, modality: str) -> None:
        super().__init__(config, spec, modality)
        if config.reduction < 1 or not 0.0 <= config.mix <= 1.0:
            raise InvalidInputError(f"output-mlp: got reduction={config.reduction}, mix={config.mix}; need "
                                    "reduction >= 1 and 0 <= mix <= 1")
        dim = port_dim(spec, f"{modality}.embeds")
        hidden = max(1, dim // config.reduction)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False))
        nn.init.zeros_(self.mlp[2].weight)


    def after(self, embeds: torch.Tensor) -> torch.Tensor:
        mix = self.config.mix
        return (1 - mix) * embeds + mix * self.mlp(embeds)  # [B, E]
