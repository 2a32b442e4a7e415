"""Plain diffusers autograd for the diffusion tests: text encoder -> UNet, with a client's edits applied by hooks on
the untouched modules (the boundary must give the same values and gradients)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

Tensor = torch.Tensor


@contextlib.contextmanager
def hooked(module: torch.nn.Module, hook: Any, pre: bool = False) -> Iterator[None]:
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def predict(parts: dict[str, Any], ids: Tensor, latents: Tensor, timestep: Tensor) -> Tensor:
    """``unet(latents, t, encoder_hidden_states=text_encoder(ids)[0]).sample``, as the pipeline conditions."""
    hidden = parts["text_encoder"](ids)[0]
    return parts["unet"](latents, timestep, encoder_hidden_states=hidden).sample


def predict_with_add(parts: dict[str, Any], ids: Tensor, mask: Tensor, latents: Tensor, timestep: Tensor,
                     delta: Tensor) -> Tensor:
    """The prediction with ``delta`` added to the token embeddings at real tokens (``mask`` 1)."""
    lookup = parts["text_encoder"].embeddings.token_embedding
    with hooked(lookup, lambda _m, _i, out: out + delta * mask.unsqueeze(-1)):
        return predict(parts, ids, latents, timestep)


def predict_with_layer_add(parts: dict[str, Any], layer: int, ids: Tensor, mask: Tensor, latents: Tensor,
                           timestep: Tensor, delta: Tensor) -> Tensor:
    """The prediction with ``delta`` added to the hidden states entering text encoder layer ``layer``."""
    block = parts["text_encoder"].encoder.layers[layer]
    with hooked(block, lambda _m, args: (args[0] + delta * mask.unsqueeze(-1), *args[1:]), pre=True):
        return predict(parts, ids, latents, timestep)


def predict_with_insert(parts: dict[str, Any], ids: Tensor, end_id: int, latents: Tensor, timestep: Tensor,
                        tokens: Tensor) -> Tensor:
    """The prediction with ``tokens`` ``[1, K, D]`` placed before each row's end token, as textual inversion's new
    rows would be: K placeholder ids go there (the last K padding columns drop off) and the lookup's output at those
    positions is replaced by ``tokens``."""
    k = tokens.shape[1]
    ends = [int((row == end_id).nonzero()[0]) for row in ids]
    placeholder = torch.zeros(k, dtype=ids.dtype)
    new_ids = torch.stack([torch.cat([row[:e], placeholder, row[e:]])[:ids.shape[1]] for row, e in zip(ids, ends)])

    def put(_m: Any, _i: Any, out: Tensor) -> Tensor:
        return torch.stack([torch.cat([row[:e], tokens[0], row[e + k:]]) for row, e in zip(out, ends)])

    with hooked(parts["text_encoder"].embeddings.token_embedding, put):
        return predict(parts, new_ids, latents, timestep)
