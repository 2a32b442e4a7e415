"""A handle that refuses the forward call past a budget, before it is sent (``graytune train --max-calls``).

The trainer puts it in place of a model's handle during a training step, so a budget in
calls holds exactly: a call is refused before it crosses, not counted after. It sits beside
``memoize``: both wrap any handle (in process or served) and forward everything else to it.

Example:
    >>> h = metered(graytune.open_backbone("minilm", "black-box"), allowed=1)
    >>> h.encode_text(["a cat"]).shape     # torch.Size([1, 384])
    >>> h.encode_text(["a dog"])           # raises BudgetSpent; nothing was sent
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from graytune.access.handle import Handle
from graytune.types import AccessLevel, BackboneSpec, Exposure

Tensor = torch.Tensor


def metered(handle: Handle, allowed: int) -> MeteredHandle:
    """``handle`` with a budget of ``allowed`` forward calls (see ``MeteredHandle``)."""
    return MeteredHandle(handle, allowed)


class BudgetSpent(Exception):
    """A training forward would take the calls past the budget (``TrainConfig.max_calls``); it was not sent."""


class MeteredHandle:
    """``handle`` that refuses (``BudgetSpent``) the forward call past ``allowed`` calls; the handle otherwise.

    The trainer puts it in place of a model's handle during a training step, so the budget holds
    exactly: a call is refused before it is sent, not counted after.
    """

    def __init__(self, handle: Handle, allowed: int) -> None:
        self._handle, self.left = handle, allowed

    @property
    def access(self) -> AccessLevel:
        return self._handle.access

    @property
    def spec(self) -> BackboneSpec:
        return self._handle.spec

    @property
    def exposure(self) -> Exposure:
        return self._handle.exposure

    @property
    def device(self) -> torch.device:
        return self._handle.device

    @property
    def grants(self) -> frozenset[str]:
        return self._handle.grants

    @property
    def top_k_grant(self) -> int:
        return self._handle.top_k_grant

    @property
    def fingerprint(self) -> str:
        return self._handle.fingerprint

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        return self._handle.tokenize(texts)

    def forward(self, inputs: Mapping[str, Any], **kwargs: Any) -> dict[str, Tensor]:
        self._spend()
        return self._handle.forward(inputs, **kwargs)

    def generate(self, inputs: Mapping[str, Any], **kwargs: Any) -> Any:
        self._spend()
        return self._handle.generate(inputs, **kwargs)

    def generate_images(self, inputs: Mapping[str, Any], **kwargs: Any) -> Any:
        self._spend()
        return self._handle.generate_images(inputs, **kwargs)

    def encode_image(self, pixels: Tensor, **edits: Mapping[str, Tensor]) -> Tensor:
        self._spend()
        return self._handle.encode_image(pixels, **edits)

    def encode_text(self, text: Any, **edits: Mapping[str, Tensor]) -> Tensor:
        self._spend()
        return self._handle.encode_text(text, **edits)

    def module(self) -> nn.Module:
        return self._handle.module()

    def with_module(self, module: nn.Module) -> Handle:
        return self._handle.with_module(module)

    def _spend(self) -> None:
        if self.left <= 0:
            raise BudgetSpent
        self.left -= 1
