"""The benchmark cases: one adapter step, through the boundary, by plain autograd, and full fine-tuning.

Each case builds the same frozen backbone and the same adapter three ways, so
that step time and memory compare like with like.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from graytune.access import open_backbone

Step = Callable[[], None]


@dataclass
class Case:
    """A named workload and the three steps to compare."""

    name: str
    shape: str
    boundary: Callable[[], Step]
    plain: Callable[[], Step]
    full: Callable[[], Step]


def _adamw_step(params: list[nn.Parameter], loss_fn: Callable[[], torch.Tensor]) -> Step:
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step


# -- MiniLM: a shift vector on the token embeddings, batch 32 x 64 tokens ------------------------

def _minilm_batch(batch: int = 32, length: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return ids, torch.ones_like(ids), torch.randn(batch, 384, generator=g)


def _minilm_boundary() -> Step:
    handle = open_backbone("minilm", access="dark-gray")
    ids, mask, target = _minilm_batch()
    shift = nn.Parameter(torch.zeros(1, 1, 384))
    inputs = {"text.input_ids": ids, "text.attention_mask": mask}

    def loss() -> torch.Tensor:
        z = handle.forward(inputs, add={"text.token_embeds": shift}, outputs=["text.embeds"])["text.embeds"]
        return F.mse_loss(z, target)

    return _adamw_step([shift], loss)


def _minilm_module(trainable: bool) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    bert = open_backbone("minilm", access="white-box").module().requires_grad_(trainable)
    ids, mask, _ = _minilm_batch()
    m = mask.unsqueeze(-1).float()

    def encode(shift: torch.Tensor) -> torch.Tensor:
        embeds = bert.embeddings.word_embeddings(ids) + shift * m
        hidden = bert(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return (hidden * m).sum(1) / m.sum(1)

    return bert, encode


def _minilm_plain() -> Step:
    _, encode = _minilm_module(trainable=False)
    target = _minilm_batch()[2]
    shift = nn.Parameter(torch.zeros(1, 1, 384))
    return _adamw_step([shift], lambda: F.mse_loss(encode(shift), target))


def _minilm_full() -> Step:
    bert, encode = _minilm_module(trainable=True)
    target = _minilm_batch()[2]
    return _adamw_step(list(bert.parameters()), lambda: F.mse_loss(encode(torch.zeros(1, 1, 384)), target))


# -- EfficientNet-Lite0: an identity-initialised 3x3 pixel conv, batch 32 at 128 px ---------------

def _pixels(batch: int = 32, size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g)


def _pixel_adapter() -> nn.Conv2d:
    conv = nn.Conv2d(3, 3, 3, padding=1)
    nn.init.dirac_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _eff_boundary() -> Step:
    handle = open_backbone("efficientnet-lite0", access="dark-gray")
    x, y = _pixels()
    conv = _pixel_adapter()
    return _adamw_step(list(conv.parameters()), lambda: F.cross_entropy(
        handle.forward({"image.pixels": conv(x)}, outputs=["logits"])["logits"], y))


def _eff_plain() -> Step:
    model = open_backbone("efficientnet-lite0", access="white-box").module()
    x, y = _pixels()
    conv = _pixel_adapter()
    return _adamw_step(list(conv.parameters()), lambda: F.cross_entropy(model(conv(x)), y))


def _eff_full() -> Step:
    model = open_backbone("efficientnet-lite0", access="white-box").module().requires_grad_(True)
    x, y = _pixels()
    return _adamw_step(list(model.parameters()), lambda: F.cross_entropy(model(x), y))


CASES = {
    "minilm": Case("minilm", "batch 32 x 64 tokens, shift adapter", _minilm_boundary, _minilm_plain, _minilm_full),
    "efficientnet-lite0": Case("efficientnet-lite0", "batch 32 at 128 px, 3x3 pixel conv adapter",
                               _eff_boundary, _eff_plain, _eff_full),
}
