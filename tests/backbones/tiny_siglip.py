"""A tiny random SigLIP saved locally, for the ``hf-siglip:`` loader's tests (and shared suites).

No real SigLIP weights can be had on these machines. SigLIP's own tokenizer
(``SiglipTokenizer``) is SentencePiece, which is not installed here and whose
model file cannot be written without it, so the tiny model is saved with a
``tokenizers`` Unigram tokenizer that follows SigLIP's conventions: lower case,
``▁``-prefixed pieces, ``</s>`` appended as the end token, ``</s>`` also the
padding token, and only ``input_ids`` returned (no attention mask), as the
published SigLIP checkpoints' tokenizer configs say.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

#: positions of the tiny text tower (SigLIP's real ones: 64); a text of 15 characters fills them
MAX_POSITIONS = 16
IMAGE_SIZE = 32


def build_tiny_siglip(folder: Path, image_stats: tuple[list[float], list[float]] | None = None) -> Path:
    """Save a tiny random ``SiglipModel`` and a SigLIP-style character tokenizer in ``folder``.

    Args:
        folder: where to save (created).
        image_stats: a custom image mean and std to save with a ``SiglipImageProcessor``
            (``processor_config.json``), or ``None`` to save no processor.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipModel

    chars = list(string.ascii_lowercase) + list(".,!?'")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -1.0) for c in chars] + [(c, -1.5) for c in chars]
    backend = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>",
                                        unk_token="<unk>", model_max_length=MAX_POSITIONS,
                                        model_input_names=["input_ids"])
    torch.manual_seed(0)
    config = SiglipConfig(
        text_config=dict(vocab_size=len(pieces), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=MAX_POSITIONS, pad_token_id=1,
                         eos_token_id=1, bos_token_id=None),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8),
    )
    folder.mkdir(parents=True, exist_ok=True)
    SiglipModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if image_stats is not None:
        from transformers import SiglipImageProcessorPil, SiglipProcessor

        processor = SiglipProcessor(
            image_processor=SiglipImageProcessorPil(image_mean=image_stats[0], image_std=image_stats[1],
                                                    size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
            tokenizer=tokenizer,
        )
        processor.save_pretrained(folder)
    return folder
