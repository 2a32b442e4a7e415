"""LGA: learned tokens at chosen declared entry layers, independent per layer (light-gray).

Where a port allows ``insert`` (transformer layers), ``tokens`` vectors per layer
are inserted (starting at zero); where it allows only ``add`` (CNN feature maps),
a learned per-channel offset is added (starting at zero: the identity).
Inserted tokens persist through the later layers (tokens inserted at layer k
are still in the sequence at layer k+1, beside that layer's own) and, after
[CLS] with mean pooling, enter the pool: LGA with inserted tokens is not the
identity at init (cosine about 0.82 with zero-shot on MiniLM). With ``gate``
(the method ``lga-id``) their effect on the embedding is scaled by a
zero-initialised gate: exactly the identity at init, for a second backbone
call per batch (see ``TowerRequest.mix``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from graytune.adapters.base import ADAPTERS, Adapter, TowerRequest, build_gate, port_dim
from graytune.errors import InvalidInputError
from graytune.types import AccessLevel, BackboneSpec, Op, PortKind


@dataclass
class LGAConfig:
    layers: tuple[int, ...] = ()
    """Entry layers to use (the k of ``<tower>.layer.k``); empty means every declared one."""
    tokens: int = 1
    """Tokens inserted per layer where insertion is possible."""
    mode: str = "auto"
    """``insert``, ``add`` or ``auto`` (insert where the port allows it, else add)."""
    gate: str = "none"
    """``none``: inserted tokens act from the start (as before); ``scalar`` or ``channel``: their effect on the
    embedding is scaled by a zero-initialised gate (one number, or one per embedding channel), so the
    adapter is the identity at init, for a second backbone call per batch (the method lga-id)."""


@ADAPTERS.register("lga")
class LGA(Adapter):
    name = "lga"
    min_access = AccessLevel.LIGHT_GRAY
    config_class = LGAConfig
    port_patterns = ("{m}.layer.*",)
    trains = "tokens at declared entry layers"

    def __init__(self, config: LGAConfig, spec: BackboneSpec, modality: str) -> None:
        super().__init__(config, spec, modality)
        if config.tokens < 1 or config.mode not in ("auto", "insert", "add"):
            raise InvalidInputError(f"lga: got tokens={config.tokens}, mode={config.mode!r}; need tokens >= 1 and "
                                    "mode 'auto', 'insert' or 'add'")
        declared = [p for p in spec.ports if p.kind is PortKind.ENTRY and p.modality == modality]
        by_layer = {int(p.name.rsplit(".", 1)[1]): p for p in declared}
        wanted = list(config.layers) or sorted(by_layer)
        missing = [k for k in wanted if k not in by_layer]
        if missing or not wanted:
            raise InvalidInputError(f"lga: layers {missing or wanted} are not declared entry ports of {spec.id}'s "
                                    f"{modality} tower; declared: {sorted(by_layer)}")
        self.plan: dict[str, Op] = {}
        params = {}
        for k in wanted:
            port = by_layer[k]
            op = Op.INSERT if config.mode in ("auto", "insert") and Op.INSERT in port.ops else Op.ADD
            if config.mode == "insert" and op is not Op.INSERT:
                raise InvalidInputError(f"lga: {port.name} does not take inserted tokens; use mode='add'")
            shape = (1, config.tokens, port_dim(spec, port.name)) if op is Op.INSERT else (
                [d if isinstance(d, int) else 1 for d in port.shape])
            if op is Op.ADD:
                shape[0] = 1
            self.plan[port.name] = op
            params[port.name.replace(".", "_")] = nn.Parameter(torch.zeros(*shape))
        self.tokens = nn.ParameterDict(params)
        inserts = Op.INSERT in self.plan.values()  # added offsets start at zero: no gate needed there
        gate = build_gate(config.gate, spec, modality, self.name)  # checks the option even where unused
        self.gate = gate if inserts else None

    @property
    def ports(self) -> tuple[str, ...]:
        return tuple(self.plan)

    def before(self, request: TowerRequest) -> None:
        for port, op in self.plan.items():
            value = self.tokens[port.replace(".", "_")]
            if op is Op.INSERT and self.gate is not None:
                request.insert_gated(port, value, self.gate)
            elif op is Op.INSERT:
                request.insert_at(port, value)
            else:
                request.add_at(port, value)
