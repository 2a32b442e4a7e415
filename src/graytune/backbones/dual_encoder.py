"""What the transformers image–text dual encoders (``hf_clip``, ``hf_siglip``) share, written once.

CLIP and SigLIP lay their towers out alike: a vision transformer whose layers take tokens at
``image.layer.k``, a text transformer (token and position embeddings, ``encoder.layers``, a final
layernorm) whose layers take them at ``text.layer.k``, and one embedding per tower. This file
holds their loading, their common ports and spec fields, and the loops that run the two towers
with a request's edits. Each provider file keeps what differs: where inserted tokens go, how its
text tower masks attention and pools, and what its spec tells clients.

Not a provider: nothing here registers a backbone id.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from graytune.backbones.base import run_layer
from graytune.backbones.loading import image_normalisation, load_hf_checkpoint
from graytune.backbones.ports import prompt_ports, text_ports
from graytune.backbones.tokens import PortEdits
from graytune.errors import InvalidInputError
from graytune.types import BackboneSpec, Op, PortKind, PortSpec

Tensor = torch.Tensor
B = TypeVar("B")
#: the port a tower's image input arrives at, and the token ids a text input arrives as
PIXELS, INPUT_IDS = "image.pixels", "text.input_ids"


def load_dual_encoder(build: Callable[..., B], family: str, model_class: str, source: str,
                      model_types: Mapping[str, str], default_stats: tuple[list[float], list[float]],
                      default_name: str) -> B:
    """A ``transformers.<model_class>`` with its tokenizer, from a folder or a hub id, built by ``build``.

    Example:
        >>> clip = load_dual_encoder(HFClip, "hf-clip", "CLIPModel", "/models/clip", {"clip": ""},
        ...                          (OPENAI_MEAN, OPENAI_STD), "OpenAI CLIP's mean/std")

    Args:
        build: called as ``build(model, tokenizer, backbone_id, identity, image_stats, description,
            stats_source)``; the backbone id is ``<family>:<source>``.
        model_types: as ``load_hf_checkpoint`` takes them.
        default_stats: the image mean and std when the checkpoint declares none, named ``default_name``.
    """
    ckpt = load_hf_checkpoint(family, source, model_class, model_types)
    mean, std, came_from = image_normalisation(ckpt.where, default_stats, default_name)
    return build(ckpt.model, ckpt.tokenizer, f"{family}:{source}", ckpt.identity, (mean, std),
                 f"Hugging Face {model_class} from {source}.", came_from)


def dual_encoder_ports(vision_cfg: Any, text_cfg: Any, image_embeds: tuple[int, str], text_embeds: tuple[int, str],
                       image_inputs: Sequence[PortSpec] = ()) -> list[PortSpec]:
    """The ports of a CLIP-style dual encoder, in the order its fingerprint hashes them.

    ``image.pixels`` [B, 3, S, S], then ``image_inputs``, ``image.layer.k`` and ``image.prompts.k``
    for k = 1..n-1, the text tower's input, entry and prompts ports (``ports.text_ports``), and the
    two outputs ``image.embeds`` and ``text.embeds``.

    Args:
        vision_cfg: the vision config (``image_size``, ``hidden_size``, ``num_hidden_layers``).
        text_cfg: the text config (``hidden_size``, ``num_hidden_layers``, ``max_position_embeddings``).
        image_embeds: ``(E, doc)`` of ``image.embeds`` [B, E].
        text_embeds: ``(E, doc)`` of ``text.embeds`` [B, E].
        image_inputs: more image input ports, published right after ``image.pixels``.
    """
    size, width, layers = vision_cfg.image_size, vision_cfg.hidden_size, range(1, vision_cfg.num_hidden_layers)
    return [
        PortSpec(PIXELS, PortKind.INPUT, ("B", 3, size, size), "float32", (Op.REPLACE,), "image",
                 "RGB pixels, normalised with the spec's mean and std"),
        *image_inputs,
        *[PortSpec(f"image.layer.{k}", PortKind.ENTRY, ("B", "N", width), "float32",
                   (Op.ADD, Op.INSERT, Op.READ), "image", f"tokens entering vision layer {k}") for k in layers],
        *prompt_ports("image", "N", width, layers),
        *text_ports("text", text_cfg.hidden_size, range(1, text_cfg.num_hidden_layers),
                    text_cfg.max_position_embeddings),
        PortSpec("image.embeds", PortKind.OUTPUT, ("B", image_embeds[0]), "float32", (Op.READ,), "image",
                 image_embeds[1]),
        PortSpec("text.embeds", PortKind.OUTPUT, ("B", text_embeds[0]), "float32", (Op.READ,), "text",
                 text_embeds[1]),
    ]


def dual_encoder_spec(backbone_id: str, ports: Sequence[PortSpec], image: dict[str, Any], text: dict[str, Any],
                      description: str, identity: str, added_ports: Collection[str] = ()) -> BackboneSpec:
    """The spec of an image–text dual encoder, fingerprinted with ``identity`` (see ``with_fingerprint``)."""
    return BackboneSpec(
        id=backbone_id,
        modalities=("image", "text"),
        ports=tuple(ports),
        preprocess={"image": image, "text": text},
        description=description,
    ).with_fingerprint(identity, added_ports=added_ports)


def image_preprocessing(size: int, image_stats: tuple[list[float], list[float]], stats_source: str,
                        **resize: str) -> dict[str, Any]:
    """The spec's image fields: the size, how to resize (``resize``, ``crop``...), mean, std and their source."""
    mean, std = image_stats
    return {"image_size": size, **resize, "mean": mean, "std": std, "mean_std_from": stats_source,
            "range": "RGB in [0, 1]"}


def text_preprocessing(tokenizer: object | None, text_cfg: Any, **rules: Any) -> dict[str, Any]:
    """The spec's text fields: the tokenizer, ``max_tokens``, the tower's own ``rules``, the vocabulary size."""
    return {"tokenizer": type(tokenizer).__name__ if tokenizer is not None else "none (send ids)",
            "max_tokens": int(text_cfg.max_position_embeddings), **rules, "vocab_size": int(text_cfg.vocab_size)}


def require_tokenizer(tokenizer: object | None, backbone_id: str, why_none: str = "") -> Any:
    """``tokenizer``, or an error telling the client to send token ids (``why_none`` says why there is none).

    Raises:
        InvalidInputError: ``tokenizer`` is ``None``.
    """
    if tokenizer is None:
        raise InvalidInputError(f"{backbone_id} has no tokenizer{why_none}; send text.input_ids "
                                "and text.attention_mask instead of strings")
    return tokenizer


def run_towers(inputs: Mapping[str, Tensor], add: Mapping[str, Tensor], insert: Mapping[str, Tensor],
               outputs: Collection[str], reads: Collection[str],
               image: Callable[[Tensor, PortEdits], Tensor], text: Callable[[Mapping[str, Tensor], PortEdits], Tensor],
               lookups: Mapping[str, tuple[str, Callable[[Tensor], Tensor]]]) -> dict[str, Tensor]:
    """``Backbone.run`` of a dual encoder: each tower whose input came, with the edits sent to it.

    Args:
        image: ``image(pixels, edits)`` → ``[B, E]``, the image tower.
        text: ``text(inputs, edits)`` → ``[B, E]``, the text tower (``text.input_ids``, ``text.attention_mask``).
        lookups: per input port that a granted read gets without a forward (token embeddings, patch
            embeddings), the input it comes from and how: used when only such ports are asked for.

    Returns:
        ``image.embeds`` and ``text.embeds`` (those of the towers that ran) and the values read.
    """
    out: dict[str, Tensor] = {}
    if not outputs and set(reads) <= set(lookups):  # granted reads needing no forward
        for port, (source, lookup) in lookups.items():
            if source in inputs and port in reads:
                out[port] = lookup(inputs[source])
        return out
    if PIXELS in inputs:
        out["image.embeds"] = image(inputs[PIXELS], PortEdits(add, insert, reads, out))
    if INPUT_IDS in inputs:
        out["text.embeds"] = text(inputs, PortEdits(add, insert, reads, out))
    return out


def run_vision_layers(layers: Sequence[nn.Module], hidden: Tensor, edits: PortEdits, at: int) -> Tensor:
    """``hidden`` ``[B, N, D]`` through the vision ``layers``, each ``image.layer.k``'s edits applied before
    layer k; tokens inserted there go before position ``at`` (every image token is attended)."""
    mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    for k, layer in enumerate(layers):
        port = f"image.layer.{k}"
        hidden = edits.read_and_add(port, hidden)
        hidden, mask = edits.place(port, hidden, mask, at)
        hidden = run_layer(layer, hidden, None)
    return hidden


def run_text_layers(text: nn.Module, inputs: Mapping[str, Tensor], edits: PortEdits, at: int | Tensor, *,
                    attention: Callable[..., Any], max_tokens: int, model: str,
                    **layer_kwargs: Any) -> tuple[Tensor, int | Tensor]:
    """The final-layernormed hidden states of a CLIP-style text tower, the edits applied at
    ``text.token_embeds`` and at each ``text.layer.k``.

    Args:
        text: the text transformer (``embeddings.token_embedding``, ``embeddings``, ``encoder.layers``,
            ``final_layer_norm``).
        inputs: ``text.input_ids`` and ``text.attention_mask`` ``[B, L]``.
        at: where inserted tokens go: a position of every row (negative: counted from the end as the
            sequence stands at each insert), or ``[B]`` positions of a token each row has in its own
            place (CLIP's end token), which move as tokens land before them.
        attention: ``attention(inputs_embeds=, attention_mask=)`` → the mask the layers take, rebuilt
            whenever inserts change the length.
        max_tokens: the tower's positions; ``model`` names the tower in the error past them.
        layer_kwargs: passed to every layer (e.g. ``is_causal=True``).

    Returns:
        ``[B, L', D]`` hidden states, and ``at`` where the insertions moved it.

    Raises:
        InvalidInputError: more than ``max_tokens`` tokens after the inserts at ``text.token_embeds``.
    """
    mask = inputs["text.attention_mask"]
    hidden = text.embeddings.token_embedding(inputs[INPUT_IDS])  # [B, L, D]
    hidden, mask, at = _edit_text("text.token_embeds", hidden, mask, edits, at)
    if hidden.shape[1] > max_tokens:
        raise InvalidInputError(f"{hidden.shape[1]} tokens after insertion exceed this {model}'s {max_tokens} "
                                "positions; send shorter texts or fewer tokens")
    hidden = text.embeddings(inputs_embeds=hidden)
    attn, length = None, -1
    for k, layer in enumerate(text.encoder.layers):
        hidden, mask, at = _edit_text(f"text.layer.{k}", hidden, mask, edits, at)
        if hidden.shape[1] != length:
            length = hidden.shape[1]
            attn = attention(inputs_embeds=hidden, attention_mask=mask)
        hidden = run_layer(layer, hidden, attn, **layer_kwargs)
    return text.final_layer_norm(hidden), at


def _edit_text(port: str, hidden: Tensor, mask: Tensor, edits: PortEdits,
               at: int | Tensor) -> tuple[Tensor, Tensor, int | Tensor]:
    """The edits at text port ``port``: read, add (off padding), then inserts before ``at``."""
    hidden = edits.read_and_add(port, hidden, mask)
    if isinstance(at, int):
        hidden, mask = edits.place(port, hidden, mask, at)
        return hidden, mask, at
    return edits.place_before(port, hidden, mask, at)
