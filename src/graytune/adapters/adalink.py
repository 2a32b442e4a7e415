"""AdaLink: a residual low-rank adapter on the token embeddings, one per modality.

``x + up(down(x))`` at ``<tower>.token_embeds``; ``up`` starts at zero (the
identity). It must read the token embeddings, which reveals embedding-table
rows: the owner grants ``read`` there explicitly, and artifacts record it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from graytune.adapters.base import ADAPTERS, Adapter, TowerRequest, port_dim
from graytune.errors import InvalidInputError
from graytune.types import AccessLevel, BackboneSpec


@dataclass
class AdaLinkConfig:
    rank: int = 8
    """Width of the bottleneck."""


@ADAPTERS.register("adalink")
class AdaLink(Adapter):
    name = "adalink"
    min_access = AccessLevel.DARK_GRAY
    config_class = AdaLinkConfig
    port_patterns = ("{m}.token_embeds",)
    read_patterns = ("{m}.token_embeds",)
    trains = "a residual low-rank map of the token embeddings"

    def __init__(self, config: AdaLinkConfig, spec: BackboneSpec, modality: str) -> None:
        super().__init__(config, spec, modality)
        self.port = f"{modality}.token_embeds"
        if self.port not in spec.port_names():
            raise InvalidInputError(f"adalink: {spec.id}'s {modality} tower has no token-embedding port "
                                    f"({self.port}); ports: {', '.join(spec.port_names())}")
        if config.rank < 1:
            raise InvalidInputError(f"adalink: rank must be >= 1, got {config.rank}")
        dim = port_dim(spec, self.port)
        self.down = nn.Linear(dim, config.rank, bias=False)
        self.up = nn.Linear(config.rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def before(self, request: TowerRequest) -> None:
        request.add_at(self.port, self.up(self.down(request.read[self.port])))  # [B, L, D]
