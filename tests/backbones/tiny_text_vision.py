"""Tiny random text and image encoders saved in a folder, for the ``hf-text:`` and ``hf-vision:`` loaders.

No real weights can be downloaded on these machines; these builders exercise the real
loaders on what ``save_pretrained`` writes. Each returns the folder it wrote, e.g.
``graytune.open_backbone(f"hf-text:{build_tiny_bert(tmp / 'bert', pooling='cls')}")``.

Text builders write sentence-transformers files the way sentence-transformers saves
them (``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``) when
given a ``pooling``; with ``pooling=None`` the folder is a plain transformers one.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from pathlib import Path

import torch

DIM = 32
LAYERS = 3
WORDS = "a the cat dog cats dogs sleeps sleep rain on roof small run far away photo of".split()
# sentence-transformers' Pooling config keys, and the pooling each one turns on
POOLING_KEYS = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


def _wordpiece_vocab(specials: Sequence[str]) -> dict[str, int]:
    tokens = [*specials, *string.ascii_lowercase, *("##" + c for c in string.ascii_lowercase), *".,!?'", *WORDS]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def bert_tokenizer():  # type: ignore[no-untyped-def]
    """A WordPiece tokenizer with BERT's special tokens ([PAD] = 0) over letters and a few words."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab=_wordpiece_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))


def mpnet_tokenizer():  # type: ignore[no-untyped-def]
    """A WordPiece tokenizer with RoBERTa/MPNet's special tokens (<s> = 0, <pad> = 1, </s> = 2)."""
    from transformers import MPNetTokenizer

    return MPNetTokenizer(vocab=_wordpiece_vocab(["<s>", "<pad>", "</s>", "[UNK]", "<mask>"]))


def write_sentence_transformers(folder: Path, pooling: str | Sequence[str], normalize: bool = False,
                                max_seq_length: int | None = None, dim: int = DIM) -> None:
    """The files sentence-transformers saves beside a transformer: modules, pooling, limits."""
    modes = [pooling] if isinstance(pooling, str) else list(pooling)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    config = {"word_embedding_dimension": dim, **{key: mode in modes for mode, key in POOLING_KEYS.items()},
              "include_prompt": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config, indent=2))
    if max_seq_length is not None:
        (folder / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))


def _save_text(folder: Path, model: torch.nn.Module, tokenizer: object, pooling: str | Sequence[str] | None,
               normalize: bool, max_seq_length: int | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]
    if pooling is not None:
        write_sentence_transformers(folder, pooling, normalize, max_seq_length, model.config.hidden_size)
    return folder


def _sizes(dim: int = DIM) -> dict:
    return dict(hidden_size=dim, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=2 * dim)


def build_tiny_bert(folder: Path, pooling: str | Sequence[str] | None = "mean", normalize: bool = False,
                    max_seq_length: int | None = None) -> Path:
    """A tiny random ``BertModel`` (3 layers, 32-d, 40 positions) and its tokenizer in ``folder``."""
    from transformers import BertConfig, BertModel

    tokenizer = bert_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=40, pad_token_id=0, **_sizes())
    return _save_text(folder, BertModel(config), tokenizer, pooling, normalize, max_seq_length)


def build_tiny_roberta(folder: Path, pooling: str | Sequence[str] | None = "mean", normalize: bool = False,
                       max_seq_length: int | None = None, model_type: str = "roberta") -> Path:
    """A tiny random ``RobertaModel`` (or ``XLMRobertaModel`` with ``model_type="xlm-roberta"``).

    42 positions, of which 40 usable: position ids start after the padding index 1.
    """
    from transformers import RobertaConfig, RobertaModel, XLMRobertaConfig, XLMRobertaModel

    config_class, model_class = {"roberta": (RobertaConfig, RobertaModel),
                                 "xlm-roberta": (XLMRobertaConfig, XLMRobertaModel)}[model_type]
    tokenizer = mpnet_tokenizer()
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tokenizer), max_position_embeddings=42, pad_token_id=1, bos_token_id=0,
                          eos_token_id=2, type_vocab_size=1, **_sizes())
    return _save_text(folder, model_class(config), tokenizer, pooling, normalize, max_seq_length)


def build_tiny_mpnet(folder: Path, pooling: str | Sequence[str] | None = "mean", normalize: bool = False,
                     max_seq_length: int | None = None, dim: int = DIM) -> Path:
    """A tiny random ``MPNetModel`` (relative position bias; 42 positions, 40 usable) and its tokenizer.

    ``dim`` is the hidden width (a multiple of 4, the number of heads).
    """
    from transformers import MPNetConfig, MPNetModel

    tokenizer = mpnet_tokenizer()
    torch.manual_seed(0)
    config = MPNetConfig(vocab_size=len(tokenizer), max_position_embeddings=42, pad_token_id=1, bos_token_id=0,
                         eos_token_id=2, relative_attention_num_buckets=32, **_sizes(dim))
    return _save_text(folder, MPNetModel(config), tokenizer, pooling, normalize, max_seq_length)


def _save_image_processor(folder: Path, processor: object, stats: str | None) -> None:
    """``stats``: ``preprocessor`` (the image processor's own flat ``preprocessor_config.json``),
    ``processor`` (a transformers 5 processor's ``processor_config.json``, the image processor nested
    under ``image_processor``, as ``ProcessorMixin.save_pretrained`` writes it) or ``None`` (no file)."""
    if stats == "preprocessor":
        processor.save_pretrained(folder)  # type: ignore[attr-defined]
    elif stats == "processor":
        from transformers import VisionTextDualEncoderProcessor

        VisionTextDualEncoderProcessor(image_processor=processor, tokenizer=bert_tokenizer()).save_pretrained(folder)
    elif stats is not None:
        raise ValueError(f"stats must be 'preprocessor', 'processor' or None, got {stats!r}")


def build_tiny_vit(folder: Path, pooler: bool = True, stats: str | None = "preprocessor",
                   mean: Sequence[float] = (0.2, 0.3, 0.4), std: Sequence[float] = (0.5, 0.6, 0.7)) -> Path:
    """A tiny random ``ViTModel`` (32 px, 8 px patches: 16 patches, 3 layers, 32-d) and its image processor.

    With ``pooler=False`` the checkpoint has no pooler weights (as DINO ViTs and classifier heads).
    """
    from transformers import ViTConfig, ViTModel
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, **_sizes())
    folder.mkdir(parents=True, exist_ok=True)
    ViTModel(config, add_pooling_layer=pooler).save_pretrained(folder)
    _save_image_processor(folder, ViTImageProcessorPil(image_mean=list(mean), image_std=list(std),
                                                       size={"height": 32, "width": 32}), stats)
    return folder


def build_tiny_dinov2(folder: Path, crop: int = 28, stats: str | None = "preprocessor",
                      mean: Sequence[float] = (0.2, 0.3, 0.4), std: Sequence[float] = (0.5, 0.6, 0.7)) -> Path:
    """A tiny random ``Dinov2Model`` (config at 42 px, 7 px patches) used at ``crop`` px, as DINOv2 is.

    Real DINOv2 configs say 518 px and their processors crop 224: the model interpolates its
    position embeddings. The defaults do the same at small scale (6×6 positions, 4×4 patches).
    """
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    torch.manual_seed(0)
    config = Dinov2Config(image_size=42, patch_size=7, hidden_size=DIM, num_hidden_layers=LAYERS,
                          num_attention_heads=4, mlp_ratio=2)
    folder.mkdir(parents=True, exist_ok=True)
    Dinov2Model(config).save_pretrained(folder)
    _save_image_processor(folder, BitImageProcessorPil(image_mean=list(mean), image_std=list(std),
                                                       size={"shortest_edge": crop + 4},
                                                       crop_size={"height": crop, "width": crop},
                                                       do_center_crop=True), stats)
    return folder
