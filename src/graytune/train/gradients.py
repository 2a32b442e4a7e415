"""Where a training step's gradients come from: one protocol, two strategies.

``Backprop`` asks the boundary for VJPs (dark-gray and up, and every client-side tensor);
``ZerothOrder`` (``graytune.train.zeroth``) estimates the input adapters' gradients from loss
values alone (black-box). The loop (``graytune.train.loop.fit``) calls the same five methods on
either and never asks which it holds; a new way of getting gradients is one more class here.

Example:
    >>> source = gradient_source(model, config)        # Backprop, or ZerothOrder for dga-zo / prompt-zo
    >>> loss = source.accumulate(lambda: task.loss(model, batch), step=0, part=0, parts=1)
    >>> source.write_grads(); opt.step(); source.after_step()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from graytune.adapters import zo_parameters
from graytune.errors import InvalidInputError
from graytune.model import AdaptedModel
from graytune.train.config import TrainConfig
from graytune.train.zeroth import ZO_FIELDS, ZerothOrder, ZOSettings

Tensor = torch.Tensor


class GradientSource(Protocol):
    """How one step's gradients reach ``.grad``.

    A step calls ``accumulate`` once per batch of the step, then ``write_grads``; after the
    optimizer stepped, ``after_step``; a step cut short (a call budget) calls ``discard`` instead.
    """

    def variables(self) -> dict[str, Tensor]:
        """Tensors the optimizer steps besides the model's trainable ones."""
        ...

    def tensors(self) -> dict[str, Tensor]:
        """Tensors a checkpoint and the best state keep besides the model's trainable ones."""
        ...

    def accumulate(self, loss_of: Callable[[], Tensor], step: int, part: int = 0, parts: int = 1) -> float:
        """Add batch ``part`` (of ``parts``) of step ``step`` to the gradients; its loss / ``parts``."""
        ...

    def write_grads(self) -> None: ...

    def discard(self) -> None: ...

    def after_step(self) -> None: ...

    cost_flags: str
    """The settings that make a step cheaper (named when a call budget cannot pay for one)."""

    def step_cost(self, grad_accum: int) -> str:
        """What one step costs in loss evaluations, in words."""
        ...

    def state_dict(self) -> dict[str, Any] | None: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class Backprop:
    """Ordinary autograd: the loss's ``backward`` (VJPs from the boundary for tensors before it)."""

    cost_flags = "--grad-accum"

    def variables(self) -> dict[str, Tensor]:
        return {}

    def tensors(self) -> dict[str, Tensor]:
        return {}

    def accumulate(self, loss_of: Callable[[], Tensor], step: int, part: int = 0, parts: int = 1) -> float:
        loss = loss_of() / parts
        loss.backward()
        return float(loss.detach())

    def write_grads(self) -> None:
        pass

    def discard(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def step_cost(self, grad_accum: int) -> str:
        return f"{grad_accum} loss evaluations"

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def zeroth_order_for(model: AdaptedModel, config: TrainConfig, world: int = 1) -> ZerothOrder | None:
    """The estimator for ``model``'s zeroth-order adapters (None without any); the zo settings refused otherwise.

    Raises:
        InvalidInputError: zo settings for a model without zeroth-order adapters, or zeroth-order
            training in a process group of ``world`` > 1.
    """
    params = zo_parameters(model)
    given = [name for name in ZO_FIELDS if getattr(config, name) is not None]
    if not params:
        if given:
            raise InvalidInputError(f"{', '.join(given)} set zeroth-order training, but method {model.method!r} has "
                                    "no adapter trained zeroth-order; use dga-zo or prompt-zo (graytune methods "
                                    "marks them) or drop those settings")
        return None
    if world > 1:
        raise InvalidInputError("zeroth-order training runs in one process; its calls are batched already: "
                                "run graytune train instead of the data-parallel entry point")
    settings = ZOSettings.resolve(*(getattr(config, name) for name in ZO_FIELDS))
    return ZerothOrder(params, settings, seed=config.seed)


def gradient_source(model: AdaptedModel, config: TrainConfig, world: int = 1) -> GradientSource:
    """``ZerothOrder`` for a model with zeroth-order adapters, ``Backprop`` otherwise."""
    return zeroth_order_for(model, config, world) or Backprop()
