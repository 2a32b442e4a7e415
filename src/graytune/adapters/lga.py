"""LGA: learned tokens at chosen declared entry layers, independent per layer (light-gray).

Where a port allows ``insert`` (transformer layers), ``tokens`` vectors per layer
are inserted (starting at zero); where it allows only ``add`` (CNN feature maps),
a learned per-channel offset is added (starting at zero: the identity).

``stacking`` says what happens to the tokens of earlier layers:

- ``accumulate`` (the method ``lga``): tokens inserted at ``<m>.layer.k`` persist
  through the later layers, beside each later layer's own, so with L text tokens
  and K tokens at each of n layers the last ones run on L + nK positions;
- ``replace`` (the method ``lga-deep``, as VPT-deep): each layer's tokens go to
  ``<m>.prompts.k`` and take the places of the previous layer's, so the sequence
  holds L + K positions from the first chosen layer on. It needs a backbone whose
  spec publishes the prompts ports (every transformer tower graytune ships).

Added offsets change no sequence, so ``stacking`` does not touch them. After [CLS]
with mean pooling inserted tokens enter the pool: LGA with inserted tokens is not
the identity at init (cosine about 0.82 with zero-shot on MiniLM). With ``gate``
(the method ``lga-id``) their effect on the embedding is scaled by a
zero-initialised gate: exactly the identity at init, for a second backbone call
per batch (see ``TowerRequest.mix``); it works with either stacking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from graytune.adapters.base import ADAPTERS, Adapter, TowerRequest, build_gate, inserted_tokens, port_dim
from graytune.errors import InvalidInputError
from graytune.types import AccessLevel, BackboneSpec, Op, PortKind, prompts_port

STACKINGS = ("accumulate", "replace")


@dataclass
class LGAConfig:
    layers: tuple[int, ...] = ()
    """Entry layers to use (the k of ``<tower>.layer.k``); empty means every declared one."""
    tokens: int = 1
    """Tokens inserted per layer where insertion is possible."""
    mode: str = "auto"
    """``insert``, ``add`` or ``auto`` (insert where the port allows it, else add)."""
    stacking: str = "accumulate"
    """``accumulate``: tokens inserted at a layer stay in the sequence at the later layers, beside theirs (it grows
    by ``tokens`` per layer); ``replace``: each layer's tokens take the places of the previous layer's (VPT-deep, the
    method lga-deep), through the ``<tower>.prompts.k`` ports. Added offsets (CNN layers) are the same under both."""
    gate: str = "none"
    """``none``: inserted tokens act from the start; ``scalar`` or ``channel``: their effect on the
    embedding is scaled by a zero-initialised gate (one number, or one per embedding channel), so the
    adapter is the identity at init, for a second backbone call per batch (the method lga-id)."""
    init: str = "auto"
    """How inserted tokens start: ``auto`` (zeros on encoders, N(0, 0.02²) on language models, where zero
    tokens give NaN gradients through deep pre-norm decoders), ``zeros`` or ``normal``; added offsets start
    at zero."""


@ADAPTERS.register("lga")
class LGA(Adapter):
    min_access = AccessLevel.LIGHT_GRAY
    config_class = LGAConfig
    port_patterns = ("{m}.layer.*", "{m}.prompts.*")
    trains = "tokens at declared entry layers"

    def __init__(self, config: LGAConfig, spec: BackboneSpec, modality: str) -> None:
        super().__init__(config, spec, modality)
        if config.tokens < 1 or config.mode not in ("auto", "insert", "add") or config.stacking not in STACKINGS:
            raise InvalidInputError(f"lga: got tokens={config.tokens}, mode={config.mode!r}, "
                                    f"stacking={config.stacking!r}; need tokens >= 1, mode 'auto', 'insert' or 'add', "
                                    "and stacking "
                                    f"{' or '.join(repr(d) for d in STACKINGS)}")
        declared = [p for p in spec.ports if p.kind is PortKind.ENTRY and p.name.startswith(f"{modality}.layer.")]
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
            target = _prompts_port(spec, port.name) if op is Op.INSERT and config.stacking == "replace" else port.name
            self.plan[target] = op
            params[target.replace(".", "_")] = inserted_tokens(shape, spec, config.init, self.name) \
                if op is Op.INSERT else nn.Parameter(torch.zeros(*shape))
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


def _prompts_port(spec: BackboneSpec, layer_port: str) -> str:
    """The prompts port beside ``layer_port`` that takes inserts (stacking ``replace``); a clear error without one."""
    name = prompts_port(layer_port)
    if name in spec.port_names() and Op.INSERT in spec.port(name).ops:
        return name
    modality = layer_port.split(".")[0]
    offered = [p for p in spec.port_names(PortKind.ENTRY) if p.startswith(f"{modality}.")]
    raise InvalidInputError(
        f"lga: stacking='replace' sends the tokens of {layer_port} to {name}, which {spec.id!r} does not publish "
        f"(its {modality} entry ports: {', '.join(offered)}); use stacking='accumulate' (the method lga), or a "
        "backbone (or a server running a newer graytune) whose spec has the prompts ports"
    )
