"""Owner-side decoding for ``hf-causal`` language models: a key–value cache, the client's edits kept on.

Each prompt row is decoded on its own (its padding dropped): the prompt runs once through the same
layer-by-layer path as a forward (``HFCausal.hidden_states``, so inserted prefix tokens, adds and
LGA tokens land exactly as in training) while every layer's keys and values go into a transformers
``DynamicCache``; then one token at a time runs through the layers against that cache. What reaches
a generated token:

- a token map ``{"down": [r, D], "up": [D, r]}`` at ``text.token_embeds``: x → x + up(down(x));
- an add of shape ``[B or 1, 1, D]`` at ``text.token_embeds`` or ``text.layer.k`` (a shift);
- its position: at each layer, the number of tokens before it there (so tokens inserted at a layer
  shift the positions of later tokens in that layer and above, as in the forward).

Adds with a length dimension ``[B or 1, L, D]`` cover the prompt's positions only.

Example:
    >>> ids, lengths = generate(lm, {"text.input_ids": ids, "text.attention_mask": mask}, {}, {}, {},
    ...                         GenerationSettings(max_new_tokens=8))      # [B, 8], [B]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from graytune.backbones.decoders import GPT2Decoder, decoder_for
from graytune.backbones.tokens import PortEdits
from graytune.errors import InvalidInputError

Tensor = torch.Tensor
EMBEDS = "text.token_embeds"


def generate(lm: Any, inputs: Mapping[str, Tensor], add: Mapping[str, Tensor], insert: Mapping[str, Tensor],
             maps: Mapping[str, Mapping[str, Tensor]], settings: Any,
             on_token: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
    """``([B, N] new ids, padded after each row's end with the pad id; [B] tokens per row)``.

    ``lm`` is an ``HFCausal``; ``settings`` a ``GenerationSettings``; ``on_token`` (one row only) gets each
    ``[1]`` token as it is chosen.
    """
    ids, mask = inputs["text.input_ids"], inputs["text.attention_mask"]
    ends = set(lm.spec.preprocess["text"].get("eos_token_ids") or []) if settings.stop_at_eos else set()
    rows = []
    for b in range(len(ids)):
        real = ids[b][mask[b].bool()].unsqueeze(0)  # [1, L_b]: right padding dropped
        row_add = {port: _row(delta, b, real.shape[1]) for port, delta in add.items()}
        row_insert = {port: _row(tokens, b) for port, tokens in insert.items()}
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + b)
        rows.append(_decode(lm, real, row_add, row_insert, maps.get(EMBEDS), settings, ends, generator,
                            on_token if len(ids) == 1 else None))
    pad = lm.spec.preprocess["text"].get("pad_token_id")
    out = torch.full((len(rows), max(1, max(len(r) for r in rows))), 0 if pad is None else int(pad),
                     dtype=torch.long)
    for b, row in enumerate(rows):
        out[b, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out, torch.tensor([len(r) for r in rows], dtype=torch.long)


def _row(values: Tensor, b: int, length: int | None = None) -> Tensor:
    """Row ``b`` of a ``[B or 1, ..., D]`` edit (a one-row edit is everyone's); a length dim cut to ``length``."""
    row = values[b:b + 1] if values.shape[0] > 1 else values
    if length is not None and row.dim() == 3 and row.shape[1] > 1:
        row = row[:, :length]
    return row


def token_mapped(embeds: Tensor, token_map: Mapping[str, Tensor] | None) -> Tensor:
    """``[1, L, D]`` embeddings through the client's map: x + up(down(x)) (unchanged without one)."""
    if token_map is None:
        return embeds
    return embeds + (embeds @ token_map["down"].T.to(embeds.dtype)) @ token_map["up"].T.to(embeds.dtype)


def _decode(lm: Any, ids: Tensor, add: dict[str, Tensor], insert: dict[str, Tensor],
            token_map: Mapping[str, Tensor] | None, settings: Any, ends: set[int], generator: torch.Generator,
            on_token: Callable[[Tensor], None] | None) -> list[int]:
    """One row's new tokens: the prompt once into the cache, then a token at a time."""
    from transformers import DynamicCache

    decoder = decoder_for(lm.model)
    cache = DynamicCache(config=lm.model.config)
    embeds = decoder.embed(ids)
    prompt_add = dict(add)
    mapped = token_mapped(embeds, token_map) - embeds  # [1, L, D] the map's change, sent as an add
    prompt_add[EMBEDS] = mapped + add[EMBEDS] if EMBEDS in add else mapped
    hidden, _ = lm.hidden_states(ids, torch.ones_like(ids), PortEdits(prompt_add, insert, (), {}), cache=cache)
    logits = decoder.logits(decoder.finish(hidden[0, -1])).float()  # [V]
    steady = {port: delta for port, delta in add.items() if delta.dim() == 3 and delta.shape[1] == 1}
    out: list[int] = []
    for _ in range(settings.max_new_tokens):
        token = choose(logits, settings, generator)
        out.append(token)
        if on_token is not None:
            on_token(torch.tensor([token]))
        if token in ends:
            break
        if cache.get_seq_length(0) + 1 > lm.max_positions:
            raise InvalidInputError(f"generation reached this model's context of {lm.max_positions} positions "
                                    "(prompt, inserted tokens and new tokens); ask for fewer new tokens")
        logits = _step(lm, decoder, token, steady, token_map, cache)
    return out


def _step(lm: Any, decoder: Any, token: int, add: Mapping[str, Tensor], token_map: Mapping[str, Tensor] | None,
          cache: Any) -> Tensor:
    """``[V]`` next-token logits after ``token`` joins every layer's cache."""
    device = next(lm.model.parameters()).device
    hidden = token_mapped(decoder.embed(torch.tensor([[token]], device=device)), token_map)  # [1, 1, D]
    if EMBEDS in add:
        hidden = hidden + add[EMBEDS]
    hidden = decoder.enter(hidden, _position(cache, 0, device))
    for k, layer in enumerate(decoder.layers):
        if k and f"text.layer.{k}" in add:
            hidden = hidden + add[f"text.layer.{k}"]
        hidden = layer(hidden, **_step_inputs(decoder, hidden, _position(cache, k, device), k), cache=cache,
                       use_cache=True)
    return decoder.logits(decoder.finish(hidden[0, -1])).float()


def _position(cache: Any, layer: int, device: torch.device) -> Tensor:
    """``[1, 1]``: how many tokens layer ``layer`` has seen (its cache's length): the new token's position there."""
    return torch.tensor([[cache.get_seq_length(layer)]], device=device)


def _step_inputs(decoder: Any, hidden: Tensor, position: Tensor, k: int) -> dict[str, Any]:
    """Layer ``k``'s keywords for one new token: no mask (it sees its whole cache; sliding-window caches keep
    only their window), and for rotary families the position embeddings of its own position."""
    if isinstance(decoder, GPT2Decoder):
        return {"attention_mask": None}
    kind = decoder.types[k]
    rope = decoder.inner.rotary_emb
    table = rope(hidden, position, kind) if decoder.rope_per_type else rope(hidden, position)
    return {"attention_mask": None, "position_embeddings": table, "position_ids": position}


def choose(logits: Tensor, settings: Any, generator: torch.Generator) -> int:
    """The next token from ``[V]`` logits: the most likely (temperature 0), or a draw at that temperature from the
    smallest set of tokens whose probability reaches ``top_p``."""
    if settings.temperature == 0:
        return int(logits.argmax())
    probs = (logits / settings.temperature).softmax(-1).cpu()
    ordered, order = probs.sort(descending=True)
    keep = ordered.cumsum(0) - ordered < settings.top_p  # always keeps the first
    ordered = ordered * keep
    return int(order[torch.multinomial(ordered / ordered.sum(), 1, generator=generator)])
