"""What every backbone handle offers, in process or over the network (a ``Protocol``).

Client code (the adapted model, training, evaluation) is written against this,
so the same adapter trains on a ``LocalHandle`` and on a ``RemoteHandle``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch import nn

from graytune.types import AccessLevel, BackboneSpec, Exposure

Tensor = torch.Tensor


class Handle(Protocol):
    """A backbone behind the boundary at one access level."""

    access: AccessLevel
    spec: BackboneSpec
    exposure: Exposure

    @property
    def grants(self) -> frozenset[str]: ...

    @property
    def fingerprint(self) -> str: ...

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]: ...

    def forward(self, inputs: Mapping[str, Tensor | Sequence[str]], *, add: Mapping[str, Tensor] | None = None,
                insert: Mapping[str, Tensor] | None = None, outputs: Sequence[str] | None = None,
                reads: Sequence[str] = ()) -> dict[str, Tensor]: ...

    def encode_image(self, pixels: Tensor, **edits: Mapping[str, Tensor]) -> Tensor: ...

    def encode_text(self, text: Sequence[str] | Mapping[str, Tensor], **edits: Mapping[str, Tensor]) -> Tensor: ...

    def module(self) -> nn.Module: ...

    def with_module(self, module: nn.Module) -> Handle: ...
