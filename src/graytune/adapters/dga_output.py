"""DGA output adapter: a residual linear map on a tower's embedding, before normalisation.

Port ``<tower>.embeds`` (read), black-box: it needs only outputs. ``W`` and ``b``
start at zero, so ``x + W x + b`` starts as the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from graytune.adapters.base import ADAPTERS, Adapter, port_dim
from graytune.types import AccessLevel, BackboneSpec


@dataclass
class DGAOutputConfig:
    bias: bool = True
    """Learn a bias beside the residual matrix."""


@ADAPTERS.register("dga-output")
class DGAOutput(Adapter):
    min_access = AccessLevel.BLACK_BOX
    config_class = DGAOutputConfig
    port_patterns = ("{m}.embeds",)
    trains = "a residual linear map of the embedding"

    def __init__(self, config: DGAOutputConfig, spec: BackboneSpec, modality: str) -> None:
        super().__init__(config, spec, modality)
        dim = port_dim(spec, f"{modality}.embeds")
        self.linear = nn.Linear(dim, dim, bias=config.bias)
        nn.init.zeros_(self.linear.weight)
        if config.bias:
            nn.init.zeros_(self.linear.bias)


    def after(self, embeds: torch.Tensor) -> torch.Tensor:
        return embeds + self.linear(embeds)  # [B, E]
