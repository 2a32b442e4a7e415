"""How each supported causal-LM family runs, one decoder layer at a time, with transformers' own parts.

``hf-causal`` runs the layers itself (so clients can edit the sequence between them); a
``Decoder`` tells it, for one model, what its token embedding is, what enters the first layer
(GPT-2 adds learned position embeddings there), what each layer takes besides the hidden states
(the causal masks from ``transformers.masking_utils``, rotary position embeddings), the final
norm and the LM head. Attention itself is always the model's own.

Families: ``llama``, ``qwen2``, ``gemma3_text`` (and ``gemma3``, whose language model is taken
out of the multimodal model at load time) run as ``RotaryDecoder``; ``gpt2`` as ``GPT2Decoder``.

Example:
    >>> decoder = decoder_for(model)                       # a LlamaForCausalLM
    >>> hidden = decoder.enter(decoder.embed(ids), positions)   # [B, L, D]
    >>> for layer, kwargs in zip(decoder.layers, decoder.layer_inputs(hidden, mask, positions)):
    ...     hidden = layer(hidden, **kwargs)
    >>> logits = decoder.logits(decoder.finish(hidden))   # [B, L, V]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

Tensor = torch.Tensor

#: model types hf-causal runs (config.json's ``model_type``)
FAMILIES = ("llama", "qwen2", "gemma3_text", "gemma3", "gpt2")


class RotaryDecoder:
    """Llama, Qwen2 and Gemma 3: rotary positions inside each attention layer, a mask per layer type.

    Args:
        model: a ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or ``Gemma3ForCausalLM``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model, self.inner, self.config = model, model.model, model.config  # type: ignore[union-attr]
        self.layers: Sequence[nn.Module] = self.inner.layers
        self.types: list[str] = list(getattr(self.config, "layer_types", None) or
                                     ["full_attention"] * len(self.layers))
        self.rope_per_type = self.config.model_type.startswith("gemma3")  # one rotary table per layer type

    def embed(self, ids: Tensor) -> Tensor:
        """``[B, L, D]``: the input embedding layer's output (Gemma's includes its sqrt(D) scale)."""
        return self.inner.embed_tokens(ids)

    def enter(self, hidden: Tensor, positions: Tensor) -> Tensor:
        """What enters the first layer: the embeddings themselves (positions are applied in attention)."""
        return hidden

    def layer_inputs(self, hidden: Tensor, mask: Tensor, positions: Tensor) -> list[dict[str, Any]]:
        """Per layer, the keyword arguments it takes besides ``hidden`` ``[B, L, D]``.

        Args:
            mask: ``[B, L]`` 1 real, 0 padding.
            positions: ``[B, L]`` position ids.
        """
        masks = causal_masks(self.config, hidden, mask, positions, set(self.types))
        rope = self.inner.rotary_emb
        tables = {t: rope(hidden, positions, t) if self.rope_per_type else rope(hidden, positions)
                  for t in set(self.types)}
        return [{"attention_mask": masks[t], "position_embeddings": tables[t], "position_ids": positions}
                for t in self.types]

    def finish(self, hidden: Tensor) -> Tensor:
        """The final norm, per token: ``[..., D]`` → ``[..., D]``."""
        return self.inner.norm(hidden)

    def logits(self, hidden: Tensor) -> Tensor:
        """The LM head (and Gemma's final soft-capping, when its config sets one): ``[..., D]`` → ``[..., V]``."""
        logits = self.model.lm_head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap


class GPT2Decoder:
    """GPT-2: learned absolute position embeddings added once, before the first block; one causal mask.

    Args:
        model: a ``GPT2LMHeadModel``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model, self.inner, self.config = model, model.transformer, model.config  # type: ignore[union-attr]
        self.layers: Sequence[nn.Module] = self.inner.h

    def embed(self, ids: Tensor) -> Tensor:
        """``[B, L, D]``: the token embedding rows (``wte``), before position embeddings."""
        return self.inner.wte(ids)

    def enter(self, hidden: Tensor, positions: Tensor) -> Tensor:
        """``hidden`` plus the position embeddings of ``positions`` ``[B, L]`` (dropout is off: eval mode)."""
        return self.inner.drop(hidden + self.inner.wpe(positions))

    def layer_inputs(self, hidden: Tensor, mask: Tensor, positions: Tensor) -> list[dict[str, Any]]:
        """Per block, ``{"attention_mask": the 4-d causal mask}`` for ``hidden`` ``[B, L, D]``, ``mask`` ``[B, L]``."""
        causal = causal_masks(self.config, hidden, mask, positions, {"full_attention"})["full_attention"]
        return [{"attention_mask": causal} for _ in self.layers]

    def finish(self, hidden: Tensor) -> Tensor:
        return self.inner.ln_f(hidden)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.model.lm_head(hidden)


Decoder = RotaryDecoder | GPT2Decoder


def decoder_for(model: nn.Module) -> Decoder:
    """The ``Decoder`` of a causal LM of one of ``FAMILIES`` (``gemma3`` after ``text_only``)."""
    return GPT2Decoder(model) if model.config.model_type == "gpt2" else RotaryDecoder(model)


def causal_masks(config: Any, hidden: Tensor, mask: Tensor, positions: Tensor, types: set[str]) -> dict[str, Any]:
    """transformers' attention masks for each layer type in ``types`` (``full_attention``, ``sliding_attention``):
    causal, padding from ``mask`` ``[B, L]`` kept out, in the form the model's attention implementation takes."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    return {t: makers[t](config=config, inputs_embeds=hidden, attention_mask=mask, cache=None,
                         position_ids=positions) for t in types}


def text_only(model: nn.Module) -> nn.Module:
    """A causal LM holding only the language model of ``model``: a multimodal ``Gemma3ForConditionalGeneration``
    becomes a ``Gemma3ForCausalLM`` sharing its language model and LM head (the vision tower is dropped);
    any other model is returned as it is."""
    if model.config.model_type != "gemma3":
        return model
    from transformers import Gemma3ForCausalLM

    with torch.device("meta"):  # no weights are drawn: both children are replaced below
        causal = Gemma3ForCausalLM(model.config.text_config)
    causal.model = model.model.language_model  # type: ignore[union-attr]
    causal.lm_head = model.lm_head  # type: ignore[union-attr]
    return causal.eval()
