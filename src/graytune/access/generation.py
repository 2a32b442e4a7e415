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

Over the network (``POST /v1/generate``, ``RemoteHandle.generate``) a request is a forward's message
(``graytune.access.wire``: ``inputs/``, ``add/``, ``insert/``) plus the token maps as ``maps/<port>/down`` and
``maps/<port>/up`` and the settings as metadata (``settings``, ``stream``); ``pack_generate`` and
``unpack_generate`` write and read it. The answer is a message of ``ids`` and ``lengths`` with ``texts`` in its
metadata (``pack_generated``); with ``stream`` it is newline-delimited JSON instead, one ``{"texts": [...]}``
per generated token, then ``{"ids", "lengths", "texts"}`` or ``{"error", "detail", "status"}``
(``stream_line``, ``read_stream_line``).

Example:
    >>> out = handle.generate({"text": ["The capital of France is"]}, settings=GenerationSettings(max_new_tokens=4))
    >>> out.texts
    [' Paris.\\n\\nThe']
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from graytune.access.checks import CallPlan, all_finite, port_for
from graytune.access.wire import CallRequest, Message, call_parts, encode, tensor_name, unpack_call
from graytune.errors import InvalidInputError
from graytune.types import AccessLevel, BackboneSpec, Exposure, GenerationSettings, Op

Tensor = torch.Tensor

#: The largest rank a token map may have (its matrices are ``[r, D]`` and ``[D, r]``).
MAX_MAP_RANK = 1024
#: What a token map holds: ``x + up(down(x))`` per token (``down`` ``[r, D]``, ``up`` ``[D, r]``).
MAP_KEYS = ("down", "up")
#: the tensor group of token maps on the wire: ``maps/<port>/down``, ``maps/<port>/up``
MAPS = "maps"


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
    return settings_as(GenerationSettings, settings, "generation", '{"max_new_tokens": 8}')


def settings_as(kind: type[Any], settings: Any, what: str, example: str) -> Any:
    """``settings`` as the dataclass ``kind`` (an instance as it is, a mapping's keys checked, None: the defaults).

    Raises:
        InvalidInputError: not a mapping, or keys ``kind`` does not have (``what`` names the settings in the message,
            ``example`` shows a good one).
    """
    if settings is None or isinstance(settings, kind):
        return settings or kind()
    if not isinstance(settings, Mapping):
        raise InvalidInputError(f"{what} settings must be an object of named fields, e.g. {example}; "
                                f"got {type(settings).__name__}")
    allowed = set(kind.__dataclass_fields__)
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise InvalidInputError(f"unknown {what} settings {unknown}; allowed: {', '.join(sorted(allowed))}")
    return kind(**settings)


def count_generated(exposure: Exposure, lengths: Tensor) -> None:
    exposure.generated_tokens += int(lengths.sum())


# ---- over the network ---------------------------------------------------------------------------------

@dataclass
class GenerateRequest:
    """A generation request as the server reads it, before its checks against the spec."""

    call: CallRequest  # the prompt and edits, as a forward's (``outputs`` empty)
    maps: dict[str, dict[str, Tensor]]  # port → {"down": [r, D], "up": [D, r]}
    settings: GenerationSettings
    stream: bool  # answer newline-delimited JSON, one line per generated token


def pack_generate(plan: CallPlan, access: str, maps: Mapping[str, Mapping[str, Tensor]],
                  settings: GenerationSettings, stream: bool = False) -> bytes:
    """A generation request for a checked ``plan`` (``pack_call``'s parts), its token maps and its settings."""
    tensors, meta = call_parts(plan, access)
    tensors.update({tensor_name(MAPS, f"{port}/{key}"): value for port, parts in maps.items()
                    for key, value in parts.items()})
    return encode(tensors, {**meta, "settings": asdict(settings), "stream": stream})


def unpack_generate(message: Message) -> GenerateRequest:
    """The generation request in ``message``; an ``InvalidInputError`` (400) naming what is wrong."""
    tensors, meta = message
    maps: dict[str, dict[str, Tensor]] = {}
    rest = {}
    for name, value in tensors.items():
        group, _, tail = name.partition("/")
        if group != MAPS:
            rest[name] = value
            continue
        port, _, key = tail.rpartition("/")
        if not port or key not in MAP_KEYS:
            raise InvalidInputError(f"tensor {name!r}: token maps are named {MAPS}/<port>/down and {MAPS}/<port>/up")
        maps.setdefault(port, {})[key] = value
    if meta.get("grad"):
        raise InvalidInputError("a generation returns token ids and no gradient; send 'grad': [] (or leave it out)")
    stream = meta.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidInputError(f"'stream' must be true or false; got {stream!r}")
    settings = meta.get("settings", {})
    stop = settings.get("stop_at_eos", True) if isinstance(settings, Mapping) else True
    if not isinstance(stop, bool):
        raise InvalidInputError(f"generation settings refused: stop_at_eos must be true or false; got {stop!r}")
    call = unpack_call((rest, {**meta, "outputs": [], "reads": []}))
    return GenerateRequest(call, maps, settings_of(settings), stream)


def pack_generated(generated: Generated) -> bytes:
    """A generation's answer: ``ids`` ``[B, N]`` and ``lengths`` ``[B]`` int64, ``texts`` in the metadata."""
    return encode({"ids": generated.ids, "lengths": generated.lengths}, {"texts": generated.texts})


def unpack_generated(message: Message) -> Generated:
    """The ``Generated`` in an answer of ``pack_generated``."""
    tensors, meta = message
    if "ids" not in tensors or "lengths" not in tensors or not isinstance(meta.get("texts"), list):
        raise InvalidInputError(f"the server's answer lacks ids, lengths or texts (it holds {sorted(tensors)}); "
                                "client and server may speak different protocol versions")
    return Generated(tensors["ids"], tensors["lengths"], [str(t) for t in meta["texts"]])


def stream_line(payload: Mapping[str, Any]) -> bytes:
    """One line of a streamed answer: ``{"texts": [...]}``, a ``Generated`` as JSON, or an error."""
    return (json.dumps(payload, ensure_ascii=False) + "\n").encode()


def generated_line(generated: Generated) -> bytes:
    """The last line of a streamed answer: the whole ``Generated``."""
    return stream_line({"ids": generated.ids.tolist(), "lengths": generated.lengths.tolist(),
                        "texts": generated.texts})


def read_stream_line(line: str) -> dict[str, Any]:
    """One streamed line as the client reads it: ``{"texts"}``, ``{"generated": Generated}`` or ``{"error", ...}``."""
    try:
        payload = json.loads(line)
    except json.JSONDecodeError:
        raise InvalidInputError(f"the server streamed a line that is not JSON: {line[:200]!r}") from None
    if not isinstance(payload, dict):
        raise InvalidInputError(f"the server streamed {type(payload).__name__}, not an object")
    if "ids" in payload:
        ids = torch.tensor(payload["ids"], dtype=torch.long).reshape(len(payload["ids"]), -1)
        return {"generated": Generated(ids, torch.tensor(payload["lengths"], dtype=torch.long),
                                       [str(t) for t in payload["texts"]])}
    return payload
