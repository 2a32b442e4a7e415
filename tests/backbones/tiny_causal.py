"""Tiny random causal LMs (Llama, Qwen2, Gemma 3, GPT-2) saved in a folder, for the ``hf-causal:`` loader,
and a tiny GGUF file written from one of them.

No real language model can be downloaded on these machines; these builders exercise the real
loader on what ``save_pretrained`` writes, with a byte-level BPE tokenizer written here (GPT-2's
scheme: 256 byte symbols, a few merges, ``<|endoftext|>``). Each returns the folder it wrote, e.g.
``graytune.open_backbone(f"hf-causal:{build_tiny_causal(tmp / 'llama', 'llama')}")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DIM, LAYERS, HEADS, KV_HEADS, CONTEXT = 32, 3, 4, 2, 64
END = "<|endoftext|>"
MERGES = [("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "s"), ("Ġ", "a"),
          ("o", "n"), ("Ġ", "d"), ("o", "g"), ("Ġd", "og")]
FAMILIES = ("llama", "qwen2", "gemma3_text", "gpt2")


def byte_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's 256 byte symbols, the tokens ``MERGES`` make, then ``<|endoftext|>``; and the merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    vocab[END] = len(vocab)
    return vocab, list(MERGES)


def tiny_tokenizer():  # type: ignore[no-untyped-def]
    """A byte-level BPE tokenizer (GPT-2's kind) over ``byte_vocab``; no pad token (the loader gives it one)."""
    from transformers import GPT2Tokenizer

    vocab, merges = byte_vocab()
    return GPT2Tokenizer(vocab=vocab, merges=merges, eos_token=END, bos_token=END, unk_token=END)


def tiny_config(family: str, vocab: int) -> Any:
    """A 3-layer, 32-d transformers config of ``family`` (Gemma 3: one full-attention layer between two
    sliding-window ones of 4 tokens, and final logit soft-capping, so both paths run)."""
    from transformers import GPT2Config, Gemma3TextConfig, LlamaConfig, Qwen2Config

    end = vocab - 1
    common = dict(vocab_size=vocab, hidden_size=DIM, intermediate_size=2 * DIM, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
                  bos_token_id=end, eos_token_id=end)
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    if family == "gemma3_text":
        return Gemma3TextConfig(**common, head_dim=DIM // HEADS, sliding_window=4, final_logit_softcapping=3.0,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                pad_token_id=end)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=DIM, n_layer=LAYERS, n_head=HEADS, n_positions=CONTEXT,
                          bos_token_id=end, eos_token_id=end)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def build_tiny_causal(folder: Path, family: str, seed: int = 0) -> Path:
    """A tiny random causal LM of ``family`` and its tokenizer, saved in ``folder``."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_gemma3_multimodal(folder: Path) -> Path:
    """A tiny random ``Gemma3ForConditionalGeneration`` (model type ``gemma3``: a 16 px SigLIP tower beside the
    Gemma 3 text model of ``tiny_config``, no logit soft-capping, as real Gemma 3 configs) and its tokenizer."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    tokenizer = tiny_tokenizer()
    text = tiny_config("gemma3_text", len(tokenizer)).to_dict()
    text["final_logit_softcapping"] = None
    image = 255  # a byte symbol no ASCII text tokenizes to
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=image,
                          boi_token_index=image, eoi_token_index=image)
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    Gemma3ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _unpermute_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's layout of a q or k projection ``[heads * head_dim, D]`` (rotary halves interleaved);
    transformers undoes it when it reads a llama GGUF."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(folder: Path, path: Path) -> Path:
    """The Llama model saved in ``folder`` (``build_tiny_causal(..., "llama")``) and its tokenizer, written as
    an fp32 GGUF file at ``path`` with llama.cpp's tensor names and metadata keys."""
    import gguf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    cfg, weights = model.config, model.state_dict()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    vocab, merges = byte_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(list(vocab))
    writer.add_token_types([3 if token == END else 1 for token in vocab])  # 3: control, 1: normal
    writer.add_token_merges([f"{left} {right}" for left, right in merges])
    writer.add_bos_token_id(vocab[END])
    writer.add_eos_token_id(vocab[END])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"].numpy())
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in names.items():
            weight = weights[f"model.layers.{i}.{ours}.weight"]
            if theirs in ("attn_q", "attn_k"):
                weight = _unpermute_rope(weight, cfg.num_attention_heads if theirs == "attn_q"
                                         else cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{theirs}.weight", weight.contiguous().numpy())
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
