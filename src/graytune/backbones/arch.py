"""Standard architectures with random weights: ``arch:clip-vit-b-16``, ``arch:clip-vit-l-14``, ``arch:clip-tiny``.

Memory and time do not depend on the weights' values, so these give the real
figures of CLIP-size backbones on machines that cannot hold the real checkpoints
(benchmarks; nothing is downloaded). They have no tokenizer: send
``text.input_ids``. The weights are drawn from a fixed seed, so the fingerprint
names the architecture and the seed.
"""

from __future__ import annotations

import torch

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


def build_clip_arch(name: str) -> HFClip:
    if name not in CLIP_ARCHS:
        from graytune.errors import UnknownNameError

        raise UnknownNameError("architecture", name, CLIP_ARCHS, "arch: backbones are random-weight CLIPs")
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


BACKBONES.register("arch:", family_help=f"{'|'.join(CLIP_ARCHS)}")(build_clip_arch)
