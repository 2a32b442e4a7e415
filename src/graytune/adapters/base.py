"""What every adapter is: a small module that edits one tower's request at its declared ports.

An adapter never sees a backbone: it gets plain data (the spec) when built, and
during a forward it edits a ``TowerRequest`` (the inputs, ``add``/``insert``
tensors for the boundary) before the call, and the tower's embeddings after.

Example:
    >>> adapter = build_adapter("dga-output", spec, modality="image")
    >>> adapter.min_access
    <AccessLevel.BLACK_BOX: 0>

An adapter file holds ``XConfig`` and ``X(Adapter)``, registered with
``@ADAPTERS.register("name")`` on the class; the class declares its ports, reads,
level and config, from which the method registry derives each method's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from graytune.adapters.declared import Declared, port_name
from graytune.config import coerce_option
from graytune.errors import InvalidInputError
from graytune.registry import Registry
from graytune.types import AccessLevel, BackboneSpec, require_level

Tensor = torch.Tensor

ADAPTERS: Registry = Registry("adapter")  # name -> Adapter subclass


@dataclass
class TowerRequest:
    """One tower's call being built by the adapters, in order.

    Attributes:
        modality: ``image`` or ``text``.
        inputs: values at input ports (``image.pixels``, ``text.input_ids``, ...).
        add: per port, the sum of the deltas adapters add there.
        insert: per port, the tokens adapters insert there, concatenated in adapter order.
        read: values at granted ports (filled before ``before`` runs, for adapters that declare ``reads``).
        gated: per port, tokens whose effect on the tower's embedding is scaled by ``gate``.
        gate: the sum of the gates of the adapters that sent ``gated`` tokens (None when none did).

    With gated tokens the tower is called twice, without and with them, and its embedding is
    ``plain + gate * (with - plain)`` (``mix``): a zero gate gives exactly the embedding without them.
    """

    modality: str
    inputs: dict[str, Tensor]
    add: dict[str, Tensor] = field(default_factory=dict)
    insert: dict[str, Tensor] = field(default_factory=dict)
    read: dict[str, Tensor] = field(default_factory=dict)
    gated: dict[str, Tensor] = field(default_factory=dict)
    gate: Tensor | None = None

    def add_at(self, port: str, delta: Tensor) -> None:
        self.add[port] = self.add[port] + delta if port in self.add else delta

    def insert_at(self, port: str, tokens: Tensor) -> None:
        self.insert[port] = _joined(self.insert.get(port), tokens)

    def insert_gated(self, port: str, tokens: Tensor, gate: Tensor) -> None:
        """Insert ``tokens`` ``[B or 1, K, D]`` at ``port`` with their effect on the embedding scaled by ``gate``."""
        self.gated[port] = _joined(self.gated.get(port), tokens)
        self.gate = gate if self.gate is None else self.gate + gate

    def all_inserts(self) -> dict[str, Tensor]:
        """Every insert, at each port the plain tokens then the gated ones (the call ``mix`` needs)."""
        return {port: _joined(self.insert.get(port), self.gated.get(port)) for port in {**self.insert, **self.gated}}

    def mix(self, plain: Tensor, gated: Tensor) -> Tensor:
        """``[B, E]``: ``plain + gate * (gated - plain)`` for the embeddings without and with the gated tokens."""
        assert self.gate is not None  # only called on requests that hold gated tokens
        return plain + self.gate * (gated - plain)


def _joined(first: Tensor | None, second: Tensor | None) -> Tensor:
    """Two token blocks ``[B or 1, K, D]`` one after the other (either may be None, not both)."""
    if first is None or second is None:
        out = first if second is None else second
        assert out is not None
        return out
    batch = max(first.shape[0], second.shape[0])
    return torch.cat([first.expand(batch, -1, -1), second.expand(batch, -1, -1)], dim=1)


class Adapter(nn.Module, Declared):
    """Base of every adapter: declares its ports, minimum level and grants; edits a request.

    Subclasses set ``name`` (the registry name), ``min_access`` and override
    ``before`` (edit the request) and/or ``after`` (map the tower's ``[B, E]``
    embeddings). Both default to leaving things unchanged.
    """

    min_access = AccessLevel.DARK_GRAY

    def __init__(self, config: Any, spec: BackboneSpec, modality: str) -> None:
        super().__init__()
        if modality not in spec.modalities:
            raise InvalidInputError(f"adapter {self.name!r} for {modality}: backbone {spec.id!r} has only "
                                    f"{', '.join(spec.modalities)}")
        self.config, self.modality = config, modality

    @property
    def ports(self) -> tuple[str, ...]:
        """The ports this adapter edits or reads (for the exposure record)."""
        return tuple(port_name(p, self.modality) for p in self.port_patterns)

    @property
    def reads(self) -> tuple[str, ...]:
        """Ports whose values must be read (granted) before ``before`` runs."""
        return tuple(port_name(p, self.modality) for p in self.read_patterns)

    def before(self, request: TowerRequest) -> None:  # noqa: B027 - optional hook
        """Edit the request before it crosses the boundary."""

    def after(self, embeds: Tensor) -> Tensor:
        """Map the tower's ``[B, E]`` embeddings (before normalisation)."""
        return embeds

    def token_map(self) -> tuple[str, dict[str, Tensor]] | None:
        """For generation: ``(port, {"down": [r, D], "up": [D, r]})`` when this adapter maps every token's
        embedding x to ``x + up(down(x))``, so the owner applies it to generated tokens too (its ``before`` is
        then skipped); None for adapters whose edits are plain adds and inserts."""
        return None

    @property
    def zeroth_order(self) -> bool:
        """Whether it trains from forward calls alone (its tensors then never ask for a gradient)."""
        return bool(getattr(self.config, "zeroth_order", False))

    @property
    def needed_access(self) -> AccessLevel:
        """The level this adapter needs as configured: ``zo_access`` when it trains zeroth-order."""
        return self.zo_access if self.zeroth_order and self.zo_access is not None else self.min_access

    def check_level(self, granted: AccessLevel) -> None:
        """Raise ``AccessDeniedError`` when the handle's level is below what this adapter needs."""
        how = ", zeroth-order" if self.zeroth_order else ""
        require_level(granted, self.needed_access, f"adapter {self.name!r} ({self.modality}{how})")


def config_from_dict(cls: type, values: Mapping[str, Any], adapter: str) -> Any:
    """``cls(**values)``; unknown keys are reported all at once with the allowed ones.

    Values read from JSON or a command line are coerced to the field's type
    (a list for a tuple field, ``"2,4"`` for ``tuple[int, ...]``, ``"false"`` for a bool).
    """
    allowed = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise InvalidInputError(f"adapter {adapter!r}: unknown option(s) {', '.join(unknown)}; "
                                f"allowed: {', '.join(sorted(allowed))}")
    return cls(**{k: coerce_option(f"{adapter}.{k}", allowed[k].type, v) for k, v in values.items()})


def zo_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The tensors of ``model``'s adapters that train zeroth-order, by their names in ``model``."""
    found: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, Adapter) and module.zeroth_order:
            found.update(module.named_parameters(prefix=name))
    return found


def build_adapter(name: str, spec: BackboneSpec, modality: str, **options: Any) -> Adapter:
    """The adapter registered as ``name`` for one ``modality`` of ``spec``, with ``options``."""
    adapter_class: type[Adapter] = ADAPTERS.lookup(name)[0]
    return adapter_class(config_from_dict(adapter_class.config_class, options, name), spec, modality)


#: how inserted tokens start: ``auto`` (zeros on encoders, small random values on language models), ``zeros``,
#: ``normal`` (N(0, 0.02²))
TOKEN_INITS = ("auto", "zeros", "normal")
TOKEN_STD = 0.02


def inserted_tokens(shape: tuple[int, ...] | list[int], spec: BackboneSpec, how: str, adapter: str) -> nn.Parameter:
    """New tokens to insert, ``[1, K, D]``: zeros, or N(0, 0.02²) (drawn from torch's global generator).

    ``auto`` gives zeros on encoders (what graytune always did) and random values on a causal language model:
    there a zero token stays exactly zero through every pre-norm decoder layer, and each RMSNorm multiplies
    its gradient by 1/sqrt(eps) (about 316), which overflows to NaN within SmolLM2's 30 layers.
    """
    if how not in TOKEN_INITS:
        raise InvalidInputError(f"{adapter}: init must be one of {', '.join(TOKEN_INITS)}; got {how!r}")
    language_model = "text.target_logprobs" in spec.port_names()
    if how == "normal" or (how == "auto" and language_model):
        return nn.Parameter(TOKEN_STD * torch.randn(*shape))
    return nn.Parameter(torch.zeros(*shape))


GATES = ("none", "scalar", "channel")


def build_gate(kind: str, spec: BackboneSpec, modality: str, adapter: str) -> nn.Parameter | None:
    """A zero gate on inserted tokens' effect: ``[1]`` (``scalar``), ``[E]`` (``channel``) or None (``none``)."""
    if kind not in GATES:
        raise InvalidInputError(f"{adapter}: gate must be one of {', '.join(GATES)}; got {kind!r}")
    if kind == "none":
        return None
    return nn.Parameter(torch.zeros(port_dim(spec, f"{modality}.embeds") if kind == "channel" else 1))


def port_dim(spec: BackboneSpec, port: str) -> int:
    """The fixed feature size (last dim, or channels for image maps) of ``port``."""
    shape = spec.port(port).shape
    dims = [d for d in shape[1:] if isinstance(d, int)]
    if not dims:
        raise InvalidInputError(f"port {port} of {spec.id} has no fixed feature size: {list(shape)}")
    return dims[-1] if len(shape) in (2, 3) else dims[0]
