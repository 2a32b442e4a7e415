"""Generation through the boundary: the owner decodes a language model, the client gets tokens back.

A client sends its prompt (text or ids) with the same ``add``/``insert`` edits a forward takes, plus
*token maps*: per-token functions the owner applies to every token's embedding, the prompt's and
each generated one's (AdaLink's ``x + up(down(x))`` is one; a shift is a broadcast ``add``).
Edits then act on generated tokens as they did on the prompt when the adapter was trained:

- an ``add`` of shape ``[B or 1, 1, D]`` (a shift) is added to every token, generated ones too;
  an ``add`` with a length dimension ``[B or 1, L, D]`` covers the prompt's positions only;
- inserted tokens (soft prompts, DGA's extra token, LGA's prefix tokens) sit before the prompt once;
- a token map at ``text.token_embeds`` needs the owner's read grant there, as AdaLink's training did.

Nothing but token ids (and their text) comes back: no logits, no gradient. Each generation is one
forward query of its rows in the exposure record, and its tokens are counted in ``generated_tokens``.

Example:
    >>> out = handle.generate({"text": ["The capital of France is"]}, settings=GenerationSettings(max_new_tokens=4))
    >>> out.texts
    [' Paris.\\n\\nThe']
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

from graytune.access.checks import CallPlan, all_finite, port_for
from graytune.errors import InvalidInputError
from graytune.types import AccessLevel, BackboneSpec, Exposure, GenerationSettings, Op

Tensor = torch.Tensor

#: The largest rank a token map may have (its matrices are ``[r, D]`` and ``[D, r]``).
MAX_MAP_RANK = 1024
#: What a token map holds: ``x + up(down(x))`` per token (``down`` ``[r, D]``, ``up`` ``[D, r]``).
MAP_KEYS = ("down", "up")


@dataclass
class Generated:
    """What a generation returns.

    Attributes:
        ids: ``[B, N]`` generated token ids, each row padded after its last token with the pad id.
        lengths: ``[B]`` tokens generated per row (the end-of-sequence token counted when it came).
        texts: each row's tokens decoded by the owner's tokenizer.
    """

    ids: Tensor
    lengths: Tensor
    texts: list[str]


def check_maps(spec: BackboneSpec, level: AccessLevel, grants: Collection[str],
               maps: Mapping[str, Mapping[str, Tensor]], exposure: Exposure) -> dict[str, dict[str, Tensor]]:
    """Each token map checked: at a granted input port, ``down`` ``[r, D]`` and ``up`` ``[D, r]`` float32, finite.

    Raises:
        AccessDeniedError: the port is not granted for reading (what the map's adapter needed in training).
        InvalidInputError: an unknown key, a shape that does not fit the port, a rank past ``MAX_MAP_RANK``.
    """
    checked = {}
    for name, parts in maps.items():
        port = port_for(spec, name, Op.READ, level, False, grants)
        if name != "text.token_embeds":
            raise InvalidInputError(f"token maps apply at text.token_embeds, the only port every generated token "
                                    f"passes; got one at {name}")
        if not isinstance(parts, Mapping) or sorted(parts) != sorted(MAP_KEYS):
            keys = sorted(parts) if isinstance(parts, Mapping) else type(parts).__name__
            raise InvalidInputError(f"the token map at {name} must hold exactly {', '.join(MAP_KEYS)} "
                                    f"(x + up(down(x))); got {keys}")
        dim = port.shape[-1]
        down, up = parts["down"], parts["up"]
        for key, value in (("down", down), ("up", up)):
            if not isinstance(value, Tensor) or value.dtype != torch.float32 or value.dim() != 2:
                raise InvalidInputError(f"the token map's {key} at {name} must be a 2-d float32 tensor; got "
                                        f"{getattr(value, 'dtype', type(value).__name__)} "
                                        f"{list(getattr(value, 'shape', []))}")
            if not all_finite(value):
                raise InvalidInputError(f"the token map's {key} at {name} has NaN or infinite values")
        rank = down.shape[0]
        if list(down.shape) != [rank, dim] or list(up.shape) != [dim, rank] or not 1 <= rank <= MAX_MAP_RANK:
            raise InvalidInputError(f"the token map at {name} needs down [r, {dim}] and up [{dim}, r] with "
                                    f"1 <= r <= {MAX_MAP_RANK}; got {list(down.shape)} and {list(up.shape)}")
        exposure.note(port, Op.READ)
        checked[name] = {"down": down, "up": up}
    return checked


def check_generation_plan(spec: BackboneSpec, plan: CallPlan) -> None:
    """A generation needs a language model's text input (it is planned under ``no_grad``: no VJP is ever asked).

    Raises:
        InvalidInputError: the backbone does not generate, or no text was sent.
    """
    if "text.target_logprobs" not in spec.port_names():
        raise InvalidInputError(f"{spec.id} is not a language model, so it cannot generate; generation needs a "
                                "causal LM backbone (smollm2-135m, qwen2.5-0.5b, hf-causal:DIR)")
    if "text.input_ids" not in plan.inputs:
        raise InvalidInputError("generation needs a prompt: send {'text': [...]} or text.input_ids")


def settings_of(settings: GenerationSettings | Mapping[str, object] | None) -> GenerationSettings:
    """``settings`` as ``GenerationSettings`` (a mapping's keys checked; None: the defaults)."""
    if settings is None or isinstance(settings, GenerationSettings):
        return settings or GenerationSettings()
    allowed = set(GenerationSettings.__dataclass_fields__)
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise InvalidInputError(f"unknown generation settings {unknown}; allowed: {', '.join(sorted(allowed))}")
    return GenerationSettings(**settings)  # type: ignore[arg-type]


def count_generated(exposure: Exposure, lengths: Tensor) -> None:
    exposure.generated_tokens += int(lengths.sum())
