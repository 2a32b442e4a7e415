"""Port lists that several providers publish alike: a transformer text tower's, and prompts ports."""

from __future__ import annotations

from collections.abc import Sequence

from graytune.types import Op, PortKind, PortSpec


def text_ports(prefix: str, dim: int, entry_layers: Sequence[int], max_len: int) -> list[PortSpec]:
    """The input and entry ports of a transformer text tower of width ``dim``, its prompts ports included."""
    seq = ("B", "L")
    entry_layers = tuple(entry_layers)
    ports = [
        PortSpec(f"{prefix}.input_ids", PortKind.INPUT, seq, "int64", (Op.REPLACE,), prefix,
                 f"token ids from the backbone's tokenizer, at most {max_len} per row"),
        PortSpec(f"{prefix}.attention_mask", PortKind.INPUT, seq, "int64", (Op.REPLACE,), prefix,
                 "1 for real tokens, 0 for padding"),
        PortSpec(f"{prefix}.token_embeds", PortKind.INPUT, (*seq, dim), "float32",
                 (Op.ADD, Op.INSERT, Op.READ), prefix,
                 "token embeddings (the lookup rows); the lookup stays on the owner's side"),
    ]
    ports += [
        PortSpec(f"{prefix}.layer.{k}", PortKind.ENTRY, (*seq, dim), "float32",
                 (Op.ADD, Op.INSERT, Op.READ), prefix, f"hidden states entering transformer layer {k}")
        for k in entry_layers
    ]
    return ports + prompt_ports(prefix, "L", dim, entry_layers)


def prompt_ports(prefix: str, seq: str, dim: int, entry_layers: Sequence[int]) -> list[PortSpec]:
    """``<prefix>.prompts.k`` for each entry layer k: prompt tokens that take the places of the previous
    layer's instead of joining them (VPT-deep), on a tower whose ``<prefix>.layer.k`` take inserts.

    Args:
        seq: the name of the sequence dim (``L`` for text, ``N`` for image tokens).
        dim: the tower's width.

    A tower places them with a ``PromptSlots`` per forward. They came after adapters had been trained on
    every tower, so ``BackboneSpec.with_fingerprint`` leaves them out of the hash.
    """
    return [PortSpec(f"{prefix}.prompts.{k}", PortKind.ENTRY, ("B", seq, dim), "float32", (Op.INSERT,), prefix,
                     f"prompt tokens entering layer {k}: the first prompts port a request sends inserts them as "
                     f"an insert at {prefix}.layer.{k} would; each later one writes over those tokens (same K)")
            for k in entry_layers]
