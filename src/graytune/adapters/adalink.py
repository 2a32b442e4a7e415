"""AdaLink (Wang et al., "Non-Intrusive Adaptation"): a residual low-rank adapter on one tower's input tokens.

``x + up(down(x))`` at the tower's input-token port: ``text.token_embeds`` (the
embedding-table rows of the text), ``image.patch_embeds`` (the patch projection's
outputs, on backbones that publish it: ``hf-clip:``, ``hf-vision:``, ``arch:``).
``up`` starts at zero (the identity). It must read the port's values, which for
token embeddings reveals embedding-table rows: the owner grants ``read`` there
explicitly, and artifacts record it. The method ``adalink`` puts one on every
tower that has such a port and nothing at the outputs, as the paper does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from graytune.adapters.base import ADAPTERS, Adapter, TowerRequest, port_dim
from graytune.adapters.declared import port_name
from graytune.errors import InvalidInputError
from graytune.types import AccessLevel, BackboneSpec

PORT = "{m}.{tokens}"
Tensor = torch.Tensor


@dataclass
class AdaLinkConfig:
    rank: int = 8
    """Width of the bottleneck."""


@ADAPTERS.register("adalink")
class AdaLink(Adapter):
    min_access = AccessLevel.DARK_GRAY
    config_class = AdaLinkConfig
    port_patterns = (PORT,)
    read_patterns = (PORT,)
    trains = "a residual low-rank map of the input token embeddings"

    def __init__(self, config: AdaLinkConfig, spec: BackboneSpec, modality: str) -> None:
        super().__init__(config, spec, modality)
        self.port = port_name(PORT, modality)
        if self.port not in spec.port_names():
            raise InvalidInputError(f"adalink: {spec.id}'s {modality} tower publishes no input-token port "
                                    f"({self.port}), so AdaLink cannot adapt it; its ports: "
                                    f"{', '.join(spec.port_names())}. The method adalink leaves such towers as "
                                    "they are; adalink+output adapts the text tokens and both outputs")
        if config.rank < 1:
            raise InvalidInputError(f"adalink: rank must be >= 1, got {config.rank}")
        dim = port_dim(spec, self.port)
        self.down = nn.Linear(dim, config.rank, bias=False)
        self.up = nn.Linear(config.rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def before(self, request: TowerRequest) -> None:
        request.add_at(self.port, self.up(self.down(request.read[self.port])))  # [B, L or N, D]

    def token_map(self) -> tuple[str, dict[str, Tensor]]:
        """The owner applies ``x + up(down(x))`` to every token while it generates (``down`` [r, D], ``up`` [D, r])."""
        return self.port, {"down": self.down.weight.detach(), "up": self.up.weight.detach()}
