"""Any transformers text encoder with sentence-transformers pooling: ``hf-text:<local dir or hub id>``.

Ports, like ``minilm``'s: ``text.input_ids``/``text.attention_mask`` (replace),
``text.token_embeds`` [B, L, D] (add, insert right after the first token, [CLS]
or <s>, read when granted), ``text.layer.k`` for k = 1..n-1 (entries into
transformer layer k), ``text.prompts.k`` (prompt tokens there that each later
one writes over: ``tokens.PromptSlots``), ``text.embeds`` [B, D]: the pooling the folder's
sentence-transformers config declares (``modules.json`` → ``1_Pooling/config.json``):
the masked mean of the last hidden state (also when nothing is declared) or its
first token. Embeddings are never normalised, even when a ``Normalize`` module
is declared (the spec records that it is).

Model types: ``bert``, ``roberta``, ``xlm-roberta`` and ``mpnet`` (whose layers
take a relative position bias). Nothing here downloads on its own: a hub id
loads only where the hub is reachable and allowed; tests use tiny random models
they save locally.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graytune.backbones.base import OneModule, freeze, run_layer
from graytune.backbones.loading import (
    ALLOW_DOWNLOADS, checkpoint_location, file_identity, hub_json, hub_options, quiet_loading,
)
from graytune.backbones.ports import text_ports
from graytune.backbones.registry import BACKBONES
from graytune.backbones.tokens import PromptSlots, add_delta, masked_mean
from graytune.errors import InvalidInputError, MissingDependencyError
from graytune.types import BackboneSpec, Op, PortKind, PortSpec

Tensor = torch.Tensor


@dataclass(frozen=True)
class Family:
    """How a supported model type embeds positions and calls its layers."""

    offset_positions: bool  # position ids count from padding_idx + 1, padding keeps padding_idx (RoBERTa, MPNet)
    token_types: bool  # the embeddings add token-type rows (all type 0 for one sentence)
    relative_bias: bool  # each layer takes the encoder's relative position bias (MPNet)


FAMILIES = {
    "bert": Family(offset_positions=False, token_types=True, relative_bias=False),
    "roberta": Family(offset_positions=True, token_types=True, relative_bias=False),
    "xlm-roberta": Family(offset_positions=True, token_types=True, relative_bias=False),
    "mpnet": Family(offset_positions=True, token_types=False, relative_bias=True),
}
POOLINGS = ("mean", "cls")
# sentence-transformers' Pooling config keys, and the mode each one turns on
_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class SentenceConfig:
    """What a sentence-transformers folder declares around its transformer.

    Attributes:
        pooling: ``mean`` or ``cls``.
        normalize: a ``Normalize`` module follows the pooling.
        max_seq_length: ``sentence_bert_config.json``'s token limit, if any.
        subfolder: where the transformer's files are ("" for the folder itself).
        source: the file the pooling came from (or a line saying none declares it).
    """

    pooling: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None
    subfolder: str = ""
    source: str = "no sentence-transformers pooling config: the default"


def hub_config(loader: str, source: str, where: str, supported: Collection[str], subfolder: str = "") -> Any:
    """The transformers config at ``where``; refused unless its model type is one of ``supported``.

    Raises:
        MissingDependencyError: no readable config there (nothing is downloaded where the hub is off).
        InvalidInputError: a model type ``loader`` cannot run; the message lists those it can.
    """
    from transformers import AutoConfig

    try:
        with quiet_loading():
            config = AutoConfig.from_pretrained(where, subfolder=subfolder, **hub_options())
    except (OSError, ValueError) as err:
        raise MissingDependencyError(
            f"{loader}: could not read a transformers model config from {source!r}: {err}; graytune never "
            "downloads on its own: save the model (save_pretrained) with its tokenizer or processor to a folder, "
            f"or set {ALLOW_DOWNLOADS}=1 to let transformers fetch a hub id"
        ) from err
    if config.model_type not in supported:
        raise InvalidInputError(
            f"{loader}: {source!r} holds a {config.model_type!r} model; {loader} runs {', '.join(supported)} "
            "models; open others with their own loader (graytune.known_backbones() lists them)"
        )
    return config


def read_sentence_config(where: str) -> SentenceConfig:
    """The pooling, normalisation and token limit a sentence-transformers folder declares.

    Raises:
        InvalidInputError: a module or pooling mode graytune cannot run (the message lists those it can).
    """
    modules = hub_json(where, "modules.json")
    pooling_dir, normalize, subfolder = "1_Pooling", False, ""
    if modules is not None:
        pooling_dir = ""
        for module in modules:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            if kind not in _MODULES:
                raise InvalidInputError(
                    f"hf-text: {where} declares a sentence-transformers module {module.get('type')!r} "
                    f"({module.get('path') or module.get('name')}); graytune runs {', '.join(_MODULES)} only; "
                    "use a model without it, or adapt its outputs yourself"
                )
            if kind == "Transformer":
                subfolder = str(module.get("path", ""))
            elif kind == "Pooling":
                pooling_dir = str(module.get("path", ""))
            else:
                normalize = True
    pooling, source = "mean", SentenceConfig.source
    if pooling_dir:
        declared, name = hub_json(where, f"{pooling_dir}/config.json"), f"{pooling_dir}/config.json"
        if declared is not None:
            pooling, source = _pooling_mode(declared, f"{where}/{name}"), name
    sentence = hub_json(where, f"{subfolder}/sentence_bert_config.json" if subfolder else "sentence_bert_config.json")
    max_len = sentence.get("max_seq_length") if isinstance(sentence, dict) else None
    return SentenceConfig(pooling, normalize, int(max_len) if max_len else None, subfolder, source)


def _pooling_mode(declared: Mapping[str, Any], where: str) -> str:
    modes = [mode for key, mode in _POOLING_KEYS.items() if declared.get(key)]
    if not modes and isinstance(declared.get("pooling_mode"), str):
        modes = [declared["pooling_mode"]]
    if not modes:
        return "mean"
    if len(modes) > 1 or modes[0] not in POOLINGS:
        raise InvalidInputError(
            f"hf-text: {where} declares {' + '.join(modes)} pooling; graytune pools with one of "
            f"{', '.join(POOLINGS)} (mean = masked mean of the last hidden state, cls = its first token); "
            "pick a model that pools that way"
        )
    return modes[0]


class HFText(OneModule):
    """A transformers text encoder behind the graytune ports.

    Args:
        model: the frozen encoder (``BertModel``, ``RobertaModel``, ``XLMRobertaModel``, ``MPNetModel``).
        tokenizer: its tokenizer.
        sentence: the pooling and limits its sentence-transformers config declares.
        backbone_id: the id the spec carries, e.g. ``hf-text:/models/all-mpnet-base-v2``.
        identity: what the fingerprint hashes besides the spec (the weight files' identity).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, sentence: SentenceConfig, backbone_id: str,
                 identity: str) -> None:
        self.model, self.tokenizer, self.pooling = freeze(model), tokenizer, sentence.pooling
        cfg = self.model.config
        self.family = FAMILIES[cfg.model_type]
        self.max_positions = int(cfg.max_position_embeddings)  # what token embeddings may fill, inserts included
        if self.family.offset_positions:
            self.max_positions -= int(self.model.embeddings.padding_idx) + 1
        # sentence-transformers' limit, else the tokenizer's when it states a real one (unset ones read 1e30)
        stated = getattr(tokenizer, "model_max_length", None) or self.max_positions
        self.max_tokens = int(min(self.max_positions, sentence.max_seq_length or stated))
        dim = int(cfg.hidden_size)
        ports = [*text_ports("text", dim, range(1, cfg.num_hidden_layers), self.max_tokens),
                 PortSpec("text.embeds", PortKind.OUTPUT, ("B", dim), "float32", (Op.READ,), "text",
                          f"{'masked-mean' if self.pooling == 'mean' else 'first-token'} pooled sentence "
                          "embedding, not normalised")]
        normalize = ("; its sentence-transformers config declares Normalize, which graytune does not apply: "
                     "L2-normalise text.embeds to match SentenceTransformer.encode") if sentence.normalize else ""
        self.spec = BackboneSpec(
            id=backbone_id,
            modalities=("text",),
            ports=tuple(ports),
            preprocess={"text": {"tokenizer": type(tokenizer).__name__, "max_tokens": self.max_tokens,
                                 "max_positions": self.max_positions,
                                 "long_texts": f"tokens inserted at token_embeds come on top of max_tokens, up to "
                                               f"{self.max_positions} positions in all; ids longer than that are "
                                               "cut just before their end token",
                                 "insert_position": "after the first token",
                                 "vocab_size": int(cfg.vocab_size), "pooling": self.pooling,
                                 "pooling_from": sentence.source, "normalize_declared": sentence.normalize}},
            description=(f"Hugging Face {type(model).__name__} text encoder from {backbone_id.split(':', 1)[1]}, "
                         f"{self.pooling} pooling ({sentence.source}), {dim}-d, not normalised{normalize}."),
        ).with_fingerprint(identity)

    @classmethod
    def load(cls, source: str) -> HFText:
        """An encoder, its tokenizer and its sentence-transformers pooling from a folder or a hub id."""
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as err:
            raise MissingDependencyError("hf-text backbones need transformers: pip install transformers") from err
        local, where = checkpoint_location("hf-text", source, "save_pretrained (model and tokenizer, with its sentence-transformers files if any)")
        sentence = read_sentence_config(where)
        config = hub_config("hf-text", source, where, FAMILIES, sentence.subfolder)
        try:
            with quiet_loading():
                model = AutoModel.from_pretrained(where, subfolder=sentence.subfolder, config=config, **hub_options())
                tokenizer = AutoTokenizer.from_pretrained(where, subfolder=sentence.subfolder, **hub_options())
        except OSError as err:
            raise MissingDependencyError(
                f"hf-text: could not load a text encoder and tokenizer from {source!r}: {err}; "
                "graytune never downloads on its own: save the model and tokenizer to a folder first"
            ) from err
        weights = sorted((local / sentence.subfolder).glob("*.safetensors")) if local.is_dir() else []
        identity = "+".join(file_identity(w) for w in weights) or f"hub:{source}"
        return cls(model, tokenizer, sentence, f"hf-text:{source}", identity)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt")
        return {"text.input_ids": batch["input_ids"], "text.attention_mask": batch["attention_mask"]}

    def run(self, inputs, add, insert, outputs, reads):  # type: ignore[no-untyped-def]
        if not outputs and set(reads) <= {"text.token_embeds"}:  # a granted read needing no forward
            return {"text.token_embeds": self.model.embeddings.word_embeddings(inputs["text.input_ids"])}
        read: dict[str, Tensor] = {}
        pooled = self._encode(inputs["text.input_ids"], inputs["text.attention_mask"], add, insert, reads, read)
        return {"text.embeds": pooled, **read}

    def _encode(self, ids: Tensor, mask: Tensor, add: Mapping[str, Tensor], insert: Mapping[str, Tensor],
                reads: Collection[str], read: dict[str, Tensor]) -> Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        model = self.model
        hidden = model.embeddings.word_embeddings(ids)  # [B, L, D]
        prompts = PromptSlots()
        hidden, mask = _edit("text.token_embeds", hidden, mask, add, insert, reads, read, prompts)
        if hidden.shape[1] > self.max_positions:
            raise InvalidInputError(
                f"{hidden.shape[1]} tokens after insertion exceed this model's {self.max_positions} positions; "
                "send shorter texts or fewer tokens"
            )
        hidden = model.embeddings(inputs_embeds=hidden, **self._position_inputs(mask))
        attn, bias, length = None, None, -1
        for k, layer in enumerate(model.encoder.layer):
            hidden, mask = _edit(f"text.layer.{k}", hidden, mask, add, insert, reads, read, prompts)
            if hidden.shape[1] != length:  # the first layer, or tokens were inserted
                length = hidden.shape[1]
                attn = create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=mask)
                if self.family.relative_bias:
                    bias = model.encoder.compute_position_bias(hidden)  # [B, heads, L, L]
            if self.family.relative_bias:
                hidden = run_layer(layer, hidden, attn, bias)[0]
            else:
                hidden = run_layer(layer, hidden, attn)
        return hidden[:, 0] if self.pooling == "cls" else masked_mean(hidden, mask)

    def _position_inputs(self, mask: Tensor) -> dict[str, Tensor]:
        """The embeddings' position and token-type ids for the (edited) attention ``mask`` [B, L]."""
        extra: dict[str, Tensor] = {}
        if self.family.token_types:
            extra["token_type_ids"] = torch.zeros_like(mask)
        if self.family.offset_positions:  # as the model derives them from input ids: padding keeps padding_idx
            mask = mask.long()
            extra["position_ids"] = mask.cumsum(1) * mask + int(self.model.embeddings.padding_idx)
        return extra



def _edit(port: str, hidden: Tensor, mask: Tensor, add: Mapping[str, Tensor], insert: Mapping[str, Tensor],
          reads: Collection[str], read: dict[str, Tensor], prompts: PromptSlots) -> tuple[Tensor, Tensor]:
    if port in reads:
        read[port] = hidden
    if port in add:
        hidden = add_delta(port, hidden, add[port], mask)
    return prompts.place(port, hidden, mask, insert, at=1)  # after [CLS] or <s>: pooling counts them


@BACKBONES.register("hf-text:", family_help="dir or hub id")
def build_hf_text(source: str) -> HFText:
    return HFText.load(source)
