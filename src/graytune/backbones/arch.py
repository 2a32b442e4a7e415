"""Standard architectures with random weights: ``arch:clip-vit-b-16``, ``arch:clip-vit-l-14``, ``arch:clip-tiny``,
and the causal LMs ``arch:llama-1b`` (Llama-3.2-1B's shape) and ``arch:llama-tiny``.

Memory and time do not depend on the weights' values, so these give the real
figures of CLIP- and 1B-LM-size backbones on machines that cannot hold the real checkpoints
(benchmarks; nothing is downloaded). They have no tokenizer: send
``text.input_ids``. The weights are drawn from a fixed seed, so the fingerprint
names the architecture and the seed.
"""

from __future__ import annotations

import torch

from graytune.backbones.hf_causal import HFCausal
from graytune.backbones.hf_clip import OPENAI_MEAN, OPENAI_STD, HFClip
from graytune.backbones.loading import quiet_loading
from graytune.backbones.registry import BACKBONES
from graytune.errors import MissingDependencyError


#: name → (text width, text layers, text heads, vision width, vision layers, vision heads, patch, image, projection)
CLIP_ARCHS: dict[str, tuple[int, int, int, int, int, int, int, int, int]] = {
    "clip-vit-b-16": (512, 12, 8, 768, 12, 12, 16, 224, 512),
    "clip-vit-b-32": (512, 12, 8, 768, 12, 12, 32, 224, 512),
    "clip-vit-l-14": (768, 12, 12, 1024, 24, 16, 14, 224, 768),
    "clip-tiny": (32, 2, 2, 32, 2, 2, 8, 32, 16),
}


def clip_config(name: str):  # type: ignore[no-untyped-def]
    """The transformers ``CLIPConfig`` of the OpenAI CLIP called ``name`` (widths, depths, heads, patch)."""
    from transformers import CLIPConfig

    tw, tl, th, vw, vl, vh, patch, image, proj = CLIP_ARCHS[name]
    return CLIPConfig(
        text_config={"hidden_size": tw, "intermediate_size": 4 * tw, "num_hidden_layers": tl,
                     "num_attention_heads": th, "max_position_embeddings": 77, "vocab_size": 49408,
                     "eos_token_id": 49407, "bos_token_id": 49406, "pad_token_id": 49407, "hidden_act": "quick_gelu"},
        vision_config={"hidden_size": vw, "intermediate_size": 4 * vw, "num_hidden_layers": vl,
                       "num_attention_heads": vh, "patch_size": patch, "image_size": image,
                       "hidden_act": "quick_gelu"},
        projection_dim=proj,
    )


#: name → (width, layers, heads, key-value heads, MLP width, vocabulary, context); tied input and output embeddings
LLAMA_ARCHS: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "llama-1b": (2048, 16, 32, 8, 8192, 128256, 131072),  # Llama-3.2-1B's shape: 1.24 B parameters
    "llama-tiny": (32, 3, 4, 2, 64, 128, 64),
}


def llama_config(name: str):  # type: ignore[no-untyped-def]
    """The transformers ``LlamaConfig`` of the architecture ``name`` (rotary base 500000, as Llama 3's)."""
    from transformers import LlamaConfig

    width, layers, heads, kv_heads, mlp, vocab, context = LLAMA_ARCHS[name]
    return LlamaConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=mlp, vocab_size=vocab,
                       max_position_embeddings=context, tie_word_embeddings=True, rms_norm_eps=1e-5,
                       rope_theta=500000.0, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=None)


def build_llama_arch(name: str) -> HFCausal:
    """A Llama causal LM of the shape ``name`` with random weights (seed 0); no tokenizer: send ids."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]), quiet_loading():  # the caller's random state is left as it was
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(name))
    return HFCausal(model, None, f"arch:{name}", f"random:{name}:seed0",
                    f"Llama {name} architecture with random weights (seed 0), for memory and time benchmarks; "
                    "no tokenizer: send text.input_ids (and text.target_ids).")


def build_arch(name: str) -> HFClip | HFCausal:
    """The random-weight architecture ``name`` (one of ``CLIP_ARCHS`` or ``LLAMA_ARCHS``)."""
    if name in LLAMA_ARCHS:
        return build_llama_arch(name)
    return build_clip_arch(name)


def build_clip_arch(name: str) -> HFClip:
    if name not in CLIP_ARCHS:
        from graytune.errors import UnknownNameError

        raise UnknownNameError("architecture", name, [*CLIP_ARCHS, *LLAMA_ARCHS],
                               "arch: backbones are random-weight CLIPs and Llama causal LMs")
    try:
        from transformers import CLIPModel
    except ImportError as err:
        raise MissingDependencyError("arch: backbones need transformers: pip install transformers") from err
    with torch.random.fork_rng(devices=[]), quiet_loading():  # the caller's random state is left as it was
        torch.manual_seed(0)
        model = CLIPModel(clip_config(name))
    identity = f"random:{name}:seed0"
    return HFClip(model, None, f"arch:{name}", identity, (OPENAI_MEAN, OPENAI_STD),
                  f"CLIP {name} architecture with random weights (seed 0), for memory and time benchmarks; "
                  "no tokenizer: send text.input_ids.")


BACKBONES.register("arch:", family_help=f"{'|'.join([*CLIP_ARCHS, *LLAMA_ARCHS])}")(build_arch)
