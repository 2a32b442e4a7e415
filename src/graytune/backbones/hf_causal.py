"""Causal language models behind the ports: ``hf-causal:<dir, .gguf file or hub id>``, ``smollm2-135m``,
``qwen2.5-0.5b``.

Ports (modality ``text``):

- ``text.input_ids`` ``[B, L]`` and ``text.attention_mask`` ``[B, L]`` (replace): right-padded by
  ``tokenize``, which never cuts a text (ids plus inserted tokens over the context length are refused).
- ``text.target_ids`` ``[B, L]`` (replace): at position t, the token the model should predict after
  reading tokens 0..t, or -100 where there is none. From a prompt + completion: the ids shifted left
  by one, -100 over the prompt (and at the last position).
- ``text.token_embeds`` ``[B, L, D]`` (add, insert, read by grant): what the input embedding layer
  returns (Gemma's includes its sqrt(D) scale). ``text.layer.k``, k = 1..n-1: the hidden states
  entering decoder layer k; ``text.prompts.k``: VPT-deep prompts there (``tokens.PromptSlots``).
- Inserted tokens go before the first token of every row (a prefix). Positions follow the edited
  attention mask: the K inserted tokens take positions 0..K-1, the text K.., and the causal mask lets
  every later token see them. Tokens inserted at ``text.layer.k`` shift the positions of the text in
  layers k.. (rotary families; GPT-2's positions are added once, at its input).
- ``text.target_logprobs`` ``[B, L]`` float32 (read): log p(target_ids[b, t] | inserted tokens and
  tokens 0..t) at the text's own positions, 0.0 where the target is -100 or the mask is 0. Only the
  positions with a target go through the LM head, log-softmaxed in float32; full-vocabulary logits
  never cross the boundary.
- ``text.top_ids`` and ``text.top_logprobs`` ``[B, L, k]`` (read with ``top_k=k``, an owner's grant;
  ``graytune.access.topk``): the k most likely tokens after tokens 0..t and their log-probabilities
  (float32, in descending order), -100 and 0.0 where the mask is 0. Published after adapters were trained
  on these models, so they are left out of the fingerprint.

Families: ``llama``, ``qwen2``, ``gemma3_text``/``gemma3`` (text only) and ``gpt2`` (``decoders.py``).
Nothing is downloaded: a hub id loads only where the hub is reachable and allowed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graytune.backbones import decoding
from graytune.backbones.base import OneModule, freeze, run_layer
from graytune.backbones.decoders import FAMILIES, decoder_for, text_only
from graytune.backbones.dual_encoder import require_tokenizer
from graytune.backbones.gguf_cache import QWEN, SMOLLM2, PackagedGGUF, dequantised, load_gguf, packaged_gguf, \
    require_gguf
from graytune.backbones.hf_text import hub_config
from graytune.backbones.loading import checkpoint_location, file_identity, hub_options, quiet_loading
from graytune.backbones.ports import text_ports
from graytune.backbones.registry import BACKBONES
from graytune.backbones.tokens import PortEdits
from graytune.errors import InvalidInputError, MissingDependencyError
from graytune.types import TOP_IDS, TOP_LOGPROBS, BackboneSpec, Op, PortKind, PortSpec

Tensor = torch.Tensor
IGNORE = -100  #: a target id meaning "no target at this position"
TARGETS, LOGPROBS = "text.target_ids", "text.target_logprobs"


class HFCausal(OneModule):
    """A transformers causal LM behind the graytune ports (see the module docstring for their meaning).

    Args:
        model: the frozen ``*ForCausalLM`` (or ``GPT2LMHeadModel``) of one of ``decoders.FAMILIES``.
        tokenizer: its tokenizer, or ``None`` (random-weight architectures: clients send ids).
        backbone_id: the id the spec carries, e.g. ``hf-causal:/models/tiny-llama``.
        identity: what the fingerprint hashes besides the spec (the weight files' identity, never a path).
        about: the spec's description; default: one naming the model class and its source.
    """

    def __init__(self, model: nn.Module, tokenizer: Any | None, backbone_id: str, identity: str,
                 about: str = "") -> None:
        self.model, self.tokenizer = freeze(model), _right_padded(tokenizer)
        cfg = self.model.config
        if cfg.model_type not in FAMILIES or getattr(cfg, "use_bidirectional_attention", False):
            raise InvalidInputError(f"{backbone_id}: a {cfg.model_type!r} model"
                                    f"{' with bidirectional attention' if cfg.model_type in FAMILIES else ''} is not "
                                    f"a causal LM graytune runs; it runs {', '.join(FAMILIES)} causal LMs")
        self.max_positions = int(cfg.max_position_embeddings)
        self.vocab_size = int(cfg.vocab_size)
        about = about or (f"Hugging Face {type(model).__name__} causal language model from "
                          f"{backbone_id.split(':', 1)[-1]}, {cfg.num_hidden_layers} layers, {cfg.hidden_size}-d, "
                          f"vocabulary {self.vocab_size}.")
        self.spec = BackboneSpec(
            id=backbone_id, modalities=("text",), ports=tuple(causal_ports(cfg, self.max_positions)),
            preprocess={"text": self._preprocess()}, description=about,
        ).with_fingerprint(identity, added_ports=(TOP_IDS, TOP_LOGPROBS))

    def _preprocess(self) -> dict[str, Any]:
        tok, cfg = self.tokenizer, self.model.config
        generation = getattr(self.model, "generation_config", None)
        eos = getattr(generation, "eos_token_id", None) or cfg.eos_token_id
        if eos is None and tok is not None:
            eos = tok.eos_token_id
        return {
            "tokenizer": type(tok).__name__ if tok is not None else "none (send text.input_ids)",
            "vocab_size": self.vocab_size, "max_positions": self.max_positions,
            "pad_token_id": tok.pad_token_id if tok is not None else None,
            "bos_token_id": tok.bos_token_id if tok is not None else cfg.bos_token_id,
            "eos_token_ids": sorted({int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}),
            "chat_template": getattr(tok, "chat_template", None) if isinstance(getattr(tok, "chat_template", None),
                                                                               str) else None,
            "bos_token": getattr(tok, "bos_token", None) or "", "eos_token": getattr(tok, "eos_token", None) or "",
            "padding_side": "right",
            "insert_position": "before the first token",
            "targets": f"{TARGETS}[b, t] is the token to predict after tokens 0..t, {IGNORE} where there is none; "
                       f"{LOGPROBS} is 0.0 there and at padding",
            "long_texts": f"never cut: ids plus inserted tokens over {self.max_positions} positions are refused",
        }

    @classmethod
    def load(cls, source: str) -> HFCausal:
        """A causal LM and its tokenizer from a ``save_pretrained`` folder, a ``.gguf`` file or a hub id.

        Raises:
            MissingDependencyError: nothing loadable there (nothing is downloaded where the hub is off),
                or a ``.gguf`` file without the ``gguf`` package.
            InvalidInputError: a model type hf-causal does not run (the message lists those it runs).
        """
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as err:
            raise MissingDependencyError("hf-causal backbones need transformers: pip install transformers") from err
        if source.endswith(".gguf"):
            gguf = _gguf_file(source)
            model, tokenizer = load_gguf(gguf)
            return cls(text_only(model), tokenizer, f"hf-causal:{source}", file_identity(gguf))
        local, where = checkpoint_location("hf-causal", source, "save_pretrained (model and tokenizer)")
        config = hub_config("hf-causal", source, where, FAMILIES)
        try:
            with quiet_loading():
                model = AutoModelForCausalLM.from_pretrained(where, config=config, dtype=torch.float32,
                                                             **hub_options())
                tokenizer = AutoTokenizer.from_pretrained(where, **hub_options())
        except OSError as err:
            raise MissingDependencyError(
                f"hf-causal: could not load a causal LM and tokenizer from {source!r}: {err}; graytune never "
                "downloads on its own: save the model and tokenizer (save_pretrained) to a folder first"
            ) from err
        weights = sorted([*local.glob("*.safetensors"), *local.glob("*.bin")]) if local.is_dir() else []
        identity = "+".join(file_identity(w) for w in weights) or f"hub:{source}"
        return cls(text_only(model), tokenizer, f"hf-causal:{source}", identity)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``text.input_ids`` and ``text.attention_mask`` ``[B, L]``: the tokenizer's own special tokens,
        right-padded, never cut."""
        tokenizer = require_tokenizer(self.tokenizer, self.spec.id, " (random weights for benchmarks)")
        batch = tokenizer(list(texts), padding=True, return_tensors="pt")
        return {"text.input_ids": batch["input_ids"], "text.attention_mask": batch["attention_mask"]}

    def generate(self, inputs: Mapping[str, Tensor], add: Mapping[str, Tensor], insert: Mapping[str, Tensor],
                 maps: Mapping[str, Mapping[str, Tensor]], settings: Any,
                 on_token: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
        """New tokens after each prompt, decoded with a key–value cache (``graytune.backbones.decoding``)."""
        return decoding.generate(self, inputs, add, insert, maps, settings, on_token)

    def detokenize(self, ids: Tensor, lengths: Tensor) -> list[str]:
        """Each row's first ``lengths[b]`` ids as text, special tokens (the end token) left out."""
        tokenizer = require_tokenizer(self.tokenizer, self.spec.id, " (random weights for benchmarks)")
        return [tokenizer.decode(row[:int(n)].tolist(), skip_special_tokens=True) for row, n in zip(ids, lengths)]

    def run(self, inputs, add, insert, outputs, reads, top_k=0):  # type: ignore[no-untyped-def]
        ids, mask = inputs["text.input_ids"], inputs["text.attention_mask"]
        if not outputs and set(reads) <= {"text.token_embeds"}:  # a granted read needing no forward
            return {"text.token_embeds": decoder_for(self.model).embed(ids)}
        out: dict[str, Tensor] = {}
        hidden, _ = self.hidden_states(ids, mask, PortEdits(add, insert, reads, out))
        if LOGPROBS in outputs:
            out[LOGPROBS] = self.target_logprobs(hidden[:, -ids.shape[1]:], mask, inputs[TARGETS])
        if top_k:
            out[TOP_IDS], out[TOP_LOGPROBS] = self.top_next(hidden[:, -ids.shape[1]:], mask, top_k)
        return out

    def hidden_states(self, ids: Tensor, mask: Tensor, edits: PortEdits,
                      cache: Any | None = None) -> tuple[Tensor, Tensor]:
        """The last layer's output ``[B, K+L, D]`` (before the final norm) and its mask ``[B, K+L]``, for ids
        and mask ``[B, L]`` with ``edits`` applied port by port; the K inserted tokens come first.

        Args:
            cache: an empty transformers ``Cache`` (``DynamicCache(config=model.config)``) that every layer
                fills with its keys and values as it runs: the prefill of owner-side decoding (``decoding.py``).
                Layer k's cache then holds the tokens that layer saw (inserts at ``text.layer.j``, j <= k, included).
        """
        decoder = decoder_for(self.model)
        cached = {} if cache is None else {"cache": cache, "use_cache": True}
        hidden = edits.read_and_add("text.token_embeds", decoder.embed(ids), mask)  # [B, L, D]
        hidden, mask = edits.place("text.token_embeds", hidden, mask, at=0)  # a prefix
        positions = self._positions(mask)
        hidden = decoder.enter(hidden, positions)
        layer_inputs = decoder.layer_inputs(hidden, mask, positions)
        for k, layer in enumerate(decoder.layers):
            if k:
                port, length = f"text.layer.{k}", hidden.shape[1]
                hidden = edits.read_and_add(port, hidden, mask)
                hidden, mask = edits.place(port, hidden, mask, at=0)
                if hidden.shape[1] != length:  # tokens were inserted: positions and masks change
                    positions = self._positions(mask)
                    layer_inputs = decoder.layer_inputs(hidden, mask, positions)
            hidden = run_layer(layer, hidden, **layer_inputs[k], **cached)
        return hidden, mask

    def _positions(self, mask: Tensor) -> Tensor:
        """``[B, L]`` position ids counting the real tokens of ``mask`` (padding repeats the last one)."""
        positions = (mask.long().cumsum(1) - 1).clamp_min(0)
        if int(positions.max()) >= self.max_positions:
            raise InvalidInputError(f"{int(positions.max()) + 1} positions (text plus inserted tokens) exceed this "
                                    f"model's context of {self.max_positions}; send shorter texts or fewer tokens")
        return positions

    def target_logprobs(self, hidden: Tensor, mask: Tensor, targets: Tensor) -> Tensor:
        """``[B, L]`` float32: log p(targets[b, t]) from the last layer's ``hidden`` ``[B, L, D]`` at the text's
        positions; 0.0 where the target is -100 or ``mask`` ``[B, L]`` is 0.

        Only the positions with a target go through the final norm and the LM head ``[N, V]``.
        """
        decoder = decoder_for(self.model)
        rows, cols = ((targets != IGNORE) & (mask != 0)).nonzero(as_tuple=True)  # [N] each
        logits = decoder.logits(decoder.finish(hidden[rows, cols])).float()  # [N, V]
        picked = logits.log_softmax(-1).gather(1, targets[rows, cols].unsqueeze(1)).squeeze(1)  # [N]
        zeros = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
        return zeros.index_put((rows, cols), picked)


    @torch.no_grad()
    def top_next(self, hidden: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` most likely next tokens at each of the text's positions: ids ``[B, L, k]`` int64 and their
        log-probabilities ``[B, L, k]`` float32, most likely first; -100 and 0.0 where ``mask`` ``[B, L]`` is 0.

        From the last layer's ``hidden`` ``[B, L, D]``; only the text's real positions go through the LM head.
        """
        decoder = decoder_for(self.model)
        rows, cols = (mask != 0).nonzero(as_tuple=True)  # [N] each
        logprobs = decoder.logits(decoder.finish(hidden[rows, cols])).float().log_softmax(-1)  # [N, V]
        values, ids = logprobs.topk(k, dim=-1)  # [N, k] each
        shape = (*mask.shape, k)
        top_ids = torch.full(shape, IGNORE, dtype=torch.long, device=hidden.device).index_put((rows, cols), ids)
        top_values = torch.zeros(shape, dtype=torch.float32, device=hidden.device).index_put((rows, cols), values)
        return top_ids, top_values


def causal_ports(cfg: Any, max_positions: int) -> list[PortSpec]:
    """The ports of a causal LM with config ``cfg``: ``text_ports`` plus targets in and target log-probs out."""
    dim = int(cfg.hidden_size)
    ports = text_ports("text", dim, range(1, int(cfg.num_hidden_layers)), max_positions)
    scaled = " times sqrt(D), Gemma's scale" if cfg.model_type.startswith("gemma3") else ""
    ports = [replace(p, doc=f"what the input embedding layer returns (the lookup rows{scaled}); inserted tokens "
                            "go before the first token; the lookup stays on the owner's side")
             if p.name == "text.token_embeds" else
             replace(p, doc=p.doc + " (inserted tokens first)") if p.name.startswith("text.layer.") else p
             for p in ports]
    targets = PortSpec(TARGETS, PortKind.INPUT, ("B", "L"), "int64", (Op.REPLACE,), "text",
                       f"at position t, the token to predict after tokens 0..t, or {IGNORE} where there is none; "
                       "same shape as text.input_ids")
    logprobs = PortSpec(LOGPROBS, PortKind.OUTPUT, ("B", "L"), "float32", (Op.READ,), "text",
                        f"log p(target_ids[b, t] | inserted tokens, tokens 0..t); 0.0 where the target is {IGNORE} "
                        "or the mask is 0 (needs text.target_ids)")
    top = [PortSpec(TOP_IDS, PortKind.OUTPUT, ("B", "L", "k"), "int64", (Op.READ,), "text",
                    "the k most likely next tokens after tokens 0..t, most likely first; read with top_k=k, an "
                    f"owner's grant; {IGNORE} where the mask is 0"),
           PortSpec(TOP_LOGPROBS, PortKind.OUTPUT, ("B", "L", "k"), "float32", (Op.READ,), "text",
                    "log-probabilities of text.top_ids (read with them); 0.0 where the mask is 0")]
    return [*ports[:2], targets, *ports[2:], logprobs, *top]


def _right_padded(tokenizer: Any | None) -> Any | None:
    """``tokenizer`` padding on the right, with a pad token (its end, unknown or start token when it has none)."""
    if tokenizer is None:
        return None
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
    return tokenizer


def _gguf_file(source: str) -> Path:
    """``source`` as a GGUF file transformers can run as one of ``FAMILIES``; a clear error otherwise."""
    from transformers import AutoConfig

    gguf = Path(source).expanduser()
    if not gguf.is_file():
        raise MissingDependencyError(f"hf-causal: {source!r} is not a file; give a .gguf file, a folder written by "
                                     "save_pretrained, or a hub id")
    require_gguf()
    try:
        with quiet_loading():
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"hf-causal: transformers cannot read {source!r} ({err}); hf-causal runs "
                                f"{', '.join(FAMILIES)} causal LMs") from err
    if config.model_type not in FAMILIES:
        raise InvalidInputError(f"hf-causal: {source!r} holds a {config.model_type!r} model; hf-causal runs "
                                f"{', '.join(FAMILIES)} causal LMs")
    return gguf


@functools.cache
def load_packaged(model: PackagedGGUF) -> HFCausal:
    """A packaged GGUF model, from its de-quantised fp32 copy in the cache (made the first time), loaded once
    per process and shared (it is frozen). Its fingerprint names the GGUF's content, not the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_gguf(model)
    folder = dequantised(gguf, model.sha256)
    with quiet_loading():
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return HFCausal(lm, tokenizer, model.backbone_id, file_identity(gguf), model.about)


@BACKBONES.register("hf-causal:", family_help="dir, .gguf file or hub id")
def build_hf_causal(source: str) -> HFCausal:
    return HFCausal.load(source)


@BACKBONES.register("smollm2-135m")
def build_smollm2() -> HFCausal:
    return load_packaged(SMOLLM2)


@BACKBONES.register("qwen2.5-0.5b")
def build_qwen() -> HFCausal:
    return load_packaged(QWEN)
