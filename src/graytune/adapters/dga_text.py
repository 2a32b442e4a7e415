"""DGA text input adapter: one shift vector added to every real token embedding, plus K extra tokens.

Port ``text.token_embeds`` (add, insert), dark-gray; with ``zeroth_order`` its tensors
ask for no gradient and it trains from forward calls alone, at black-box (``dga-zo``,
and ``prompt-zo``: extra tokens only, as in black-box prompt tuning). The shift starts at zero
(the identity); the extra tokens are inserted where the tower's pooling sees
them (after [CLS] for mean pooling, before the end token for CLIP). Inserting
a token changes the sequence (and, after [CLS], every real token's position), so
with ``extra_tokens > 0`` and no gate the adapter is not an exact identity at init
(cosine about 0.86 with zero-shot on MiniLM), though the extra tokens start at zero.
With ``gate`` (the method ``dga-id``) their effect on the embedding is scaled by a
zero-initialised gate: exactly the identity at init, for a second backbone call
per batch (the embedding without the tokens; see ``TowerRequest.mix``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from graytune.adapters.base import ADAPTERS, Adapter, TowerRequest, build_gate, inserted_tokens, port_dim
from graytune.errors import InvalidInputError
from graytune.types import AccessLevel, BackboneSpec

PORT = "text.token_embeds"


@dataclass
class DGATextConfig:
    extra_tokens: int = 1
    """Number of extra tokens inserted into the sequence (0 for the shift alone)."""
    shift: bool = True
    """Learn the shift vector added to every real token."""
    zeroth_order: bool = False
    """Train from forward calls alone (graytune train --zo): its tensors ask the boundary for no gradient,
    so it runs at black-box (the methods dga-zo and prompt-zo set it)."""
    gate: str = "none"
    """``none``: the extra tokens act from the start; ``scalar`` or ``channel``: their effect on
    the embedding is scaled by a zero-initialised gate (one number, or one per embedding channel), so the
    adapter is the identity at init, for a second backbone call per batch (the method dga-id)."""
    init: str = "auto"
    """How the extra tokens start: ``auto`` (zeros on encoders, N(0, 0.02²) on language models, where zero
    tokens give NaN gradients through deep pre-norm decoders), ``zeros`` or ``normal``."""


@ADAPTERS.register("dga-text")
class DGAText(Adapter):
    min_access = AccessLevel.DARK_GRAY
    zo_access = AccessLevel.BLACK_BOX
    config_class = DGATextConfig
    port_patterns = ("{m}.token_embeds",)
    trains = "a shift added to every token embedding and extra tokens"

    def __init__(self, config: DGATextConfig, spec: BackboneSpec, modality: str = "text") -> None:
        super().__init__(config, spec, modality)
        if config.extra_tokens < 0:
            raise InvalidInputError(f"dga-text: extra_tokens must be >= 0 (0 for the shift alone); got "
                                    f"{config.extra_tokens}")
        dim = port_dim(spec, PORT)
        self.shift = nn.Parameter(torch.zeros(1, 1, dim)) if config.shift else None
        self.extra = inserted_tokens((1, config.extra_tokens, dim), spec, config.init, self.name) \
            if config.extra_tokens else None
        gate = build_gate(config.gate, spec, modality, self.name)  # checks the option even where unused
        self.gate = gate if self.extra is not None else None
        if self.gate is not None and config.zeroth_order:
            raise InvalidInputError("dga-text: gate and zeroth_order do not go together (a gated tower is called "
                                    "twice per batch); drop one")
        self.requires_grad_(not config.zeroth_order)  # zeroth-order: forward calls only, never a VJP

    def before(self, request: TowerRequest) -> None:
        if self.shift is not None:
            request.add_at(PORT, self.shift)  # [1, 1, D]
        if self.extra is not None and self.gate is not None:
            request.insert_gated(PORT, self.extra, self.gate)  # [1, K, D], its effect scaled by a zero gate
        elif self.extra is not None:
            request.insert_at(PORT, self.extra)  # [1, K, D]
