"""What every backbone provider offers the boundary, and helpers they share.

A provider file (``minilm.py``, ``efficientnet.py``, ...) is the only code that
knows a model's internals. It builds an object with the ``Backbone`` protocol;
the boundary in ``graytune.access`` is the only caller of ``run``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from graytune.errors import InvalidInputError, MissingDependencyError
from graytune.types import BackboneSpec, Op, PortKind, PortSpec, prompts_port

Tensor = torch.Tensor


@runtime_checkable
class Backbone(Protocol):
    """A frozen model and the spec it publishes. Owner side only."""

    spec: BackboneSpec

    def run(
        self,
        inputs: Mapping[str, Tensor],
        add: Mapping[str, Tensor],
        insert: Mapping[str, Tensor],
        outputs: Collection[str],
        reads: Collection[str],
    ) -> dict[str, Tensor]:
        """Compute ``outputs`` (and the values at ``reads``) as plain differentiable torch.

        Args:
            inputs: values at input ports with op ``replace``, e.g. ``image.pixels``.
            add: per port, a delta broadcast onto the port's values.
            insert: per port, ``[B or 1, K, D]`` tokens placed where pooling sees them.
            outputs: output port names to return.
            reads: input/entry port names whose values to return (granted reads only).
        """
        ...

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``text.input_ids`` and ``text.attention_mask`` for ``texts`` ([B, L] int64)."""
        ...

    def module(self) -> nn.Module:
        """The frozen module itself (white-box baselines only)."""
        ...

    def with_module(self, module: nn.Module) -> Backbone:
        """This backbone running ``module`` (a client's modified copy of ``module()``), same spec."""
        ...


_recompute = threading.local()  # on this thread: the inputs checkpointed layers keep, or None when not recomputing


@contextlib.contextmanager
def recomputing(on: bool) -> Iterator[list[Tensor]]:
    """Inside the block, ``run_layer`` keeps only each layer's inputs and recomputes the layer in the backward.

    The weights are frozen, so the recomputed activations equal the first ones exactly: this trades one
    more forward for the activation memory of every layer but one. Yields the list of tensors the
    checkpointed layers keep (each layer's inputs), so their memory can be counted.
    """
    previous = getattr(_recompute, "kept", None)
    kept: list[Tensor] = []
    _recompute.kept = kept if on else None
    try:
        yield kept
    finally:
        _recompute.kept = previous


def run_layer(layer: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``layer(*args, **kwargs)``, checkpointed when recomputation is on and a gradient is wanted.

    Every provider calls its repeated blocks (transformer layers, MBConv blocks) through this, so
    owner-side recomputation (``open_backbone(..., recompute=True)``, ``graytune serve --recompute``)
    works on every backbone.
    """
    kept = getattr(_recompute, "kept", None)
    if kept is not None and torch.is_grad_enabled():
        kept.extend(a for a in [*args, *kwargs.values()] if isinstance(a, Tensor))
        return checkpoint(layer, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
    return layer(*args, **kwargs)


class OneModule:
    """``module()``/``with_module()`` for a provider whose whole backbone is one module in ``self.model``."""

    model: nn.Module

    def module(self) -> nn.Module:
        return self.model

    def with_module(self, module: nn.Module) -> Any:
        """This provider running ``module`` (a client's modified copy of ``module()``), same spec."""
        other = copy.copy(self)
        other.model = module
        return other


def module_placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of ``module``'s first floating parameter or buffer (CPU/fp32 if none)."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def place(backbone: Backbone, device: torch.device, dtype: torch.dtype) -> Backbone:
    """``backbone`` with its module on ``device`` in ``dtype`` (a copy; the shared, cached module is untouched).

    Half precision casts the frozen weights (memory halves, the matmuls run in half); the boundary
    casts the client's tensors in and the results back to float32.
    """
    module = backbone.module()
    if module_placement(module) == (device, dtype):
        return backbone
    moved = copy.deepcopy(module).to(device=device, dtype=dtype)
    return backbone.with_module(freeze(moved))


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' per-load progress bar (library code logs, it does not print)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with no parameter requiring gradients."""
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


@functools.cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_identity(path: str | os.PathLike[str]) -> str:
    """``name:size:sha256`` of a weights file: its identity, not its content."""
    p = Path(path)
    st = p.stat()
    return f"{p.name}:{st.st_size}:{_file_sha256(str(p), st.st_size, st.st_mtime_ns)}"


@dataclass
class HFCheckpoint:
    """A transformers model and tokenizer loaded by ``load_hf_checkpoint``."""

    model: nn.Module
    tokenizer: Any
    where: str  #: the folder, or the hub id when ``source`` is no folder
    identity: str  #: the weight files' identity (``file_identity``), or ``hub:<id>``


def checkpoint_location(family: str, source: str, written_by: str) -> tuple[Path, str]:
    """``source`` as a local folder (``~`` expanded) and what ``from_pretrained`` should get: the folder,
    or ``source`` itself as a hub id.

    Raises:
        MissingDependencyError: ``source`` looks like a path (``.``, ``/``, ``~``) but is no folder; the
            message says what should be there (``written_by``).
    """
    local = Path(source).expanduser()
    if source.startswith((".", "/", "~")) and not local.is_dir():
        raise MissingDependencyError(
            f"{family}: {source!r} is not a directory; give a folder written by {written_by} or a hub id"
        )
    return local, str(local) if local.is_dir() else source


def load_hf_checkpoint(family: str, source: str, model_class: str,
                       model_types: Mapping[str, str]) -> HFCheckpoint:
    """``transformers.<model_class>`` and its tokenizer from a folder (``save_pretrained``) or a hub id.

    Example:
        >>> ckpt = load_hf_checkpoint("hf-clip", "/models/clip", "CLIPModel", {"clip": ""})

    Args:
        family: the id prefix the errors name, e.g. ``hf-clip``.
        source: a local folder or a hub id.
        model_class: the transformers class, e.g. ``CLIPModel``.
        model_types: per ``config.json`` ``model_type``: ``""`` if this family loads it, else advice on
            what loads it instead (e.g. ``{"siglip": "", "clip": "use hf-clip:<dir>"}``).

    Raises:
        MissingDependencyError: transformers (or the tokenizer's library) is missing, or nothing
            could be loaded from ``source``; nothing is ever downloaded on graytune's own initiative.
        InvalidInputError: ``source`` holds a model of another type.
    """
    try:
        import transformers
        from transformers import AutoTokenizer, PretrainedConfig
    except ImportError as err:
        raise MissingDependencyError(f"{family} backbones need transformers: pip install transformers") from err
    local, where = checkpoint_location(family, source, f"{model_class}.save_pretrained (with its tokenizer)")
    try:
        with quiet_loading():
            config, _ = PretrainedConfig.get_config_dict(where)
            if not config:
                raise OSError(f"no config.json in {where}")
            _check_model_type(family, source, str(config.get("model_type")), model_types)
            model = getattr(transformers, model_class).from_pretrained(where)
            tokenizer = AutoTokenizer.from_pretrained(where)
    except OSError as err:
        raise MissingDependencyError(
            f"{family}: could not load a {model_class} and tokenizer from {source!r}: {err}; "
            "graytune never downloads on its own: save the model and tokenizer to a folder first"
        ) from err
    except ImportError as err:  # a tokenizer whose library is missing (SentencePiece ones)
        raise MissingDependencyError(
            f"{family}: the tokenizer saved in {source!r} needs a package that is not installed ({err}); "
            "install it (SentencePiece tokenizers: pip install sentencepiece protobuf)"
        ) from err
    weights = sorted([*local.glob("*.safetensors"), *local.glob("*.bin")]) if local.is_dir() else []
    identity = "+".join(file_identity(w) for w in weights) or f"hub:{source}"
    return HFCheckpoint(model, tokenizer, where, identity)


def _check_model_type(family: str, source: str, model_type: str, model_types: Mapping[str, str]) -> None:
    loads = [t for t, advice in model_types.items() if not advice]
    if model_type not in loads:
        advice = model_types.get(model_type) or "use the loader made for that model"
        raise InvalidInputError(f"{family}: {source!r} holds a model of type {model_type!r} (config.json); "
                                f"{family} loads {' or '.join(repr(t) for t in loads)}; {advice}")


def image_normalisation(where: str, default: tuple[list[float], list[float]],
                        default_name: str) -> tuple[list[float], list[float], str]:
    """The image mean and std a checkpoint's image processor declares, and where they came from.

    Read as transformers reads them: the ``image_processor`` entry of ``processor_config.json``
    (what a processor's ``save_pretrained`` writes in transformers 5) first, then
    ``preprocessor_config.json`` (an image processor's own file, and older processors');
    ``do_normalize: false`` means mean 0 and std 1. Only when neither file gives them, ``default``.

    Example:
        >>> mean, std, came_from = image_normalisation("/models/clip", (OPENAI_MEAN, OPENAI_STD), "OpenAI CLIP's")

    Returns:
        ``(mean, std, source)``: three values each, and a line saying where they came from.
    """
    found = image_processor_config(where)
    if found is None:
        return list(default[0]), list(default[1]), f"{default_name} (the checkpoint has no image processor config)"
    cfg, label = found
    if cfg.get("do_normalize") is False:
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], f"{label}: do_normalize is false"
    if "image_mean" in cfg and "image_std" in cfg:
        return _three(cfg["image_mean"], label, "image_mean"), _three(cfg["image_std"], label, "image_std"), label
    return list(default[0]), list(default[1]), f"{default_name} ({label} sets no image_mean/image_std)"


def image_processor_config(where: str) -> tuple[dict[str, Any], str] | None:
    """The checkpoint's image processor settings and the file they came from, as transformers finds them:
    the ``image_processor`` entry of ``processor_config.json`` first, then ``preprocessor_config.json``."""
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        cfg = hub_json(where, name)
        if isinstance(cfg, dict) and key is not None:
            cfg = cfg.get(key)
        if isinstance(cfg, dict):
            return cfg, f"{name} ({key})" if key is not None else name
    return None


def hub_json(where: str, name: str) -> Any:
    """The JSON file ``name`` of a local folder or a hub repo (``None`` when it has none).

    A hub id reads through transformers' cache, as ``from_pretrained`` does: nothing
    is fetched where the hub is off (``HF_HUB_OFFLINE=1``).
    """
    path: Path | None = Path(where) / name
    if not Path(where).is_dir():
        try:
            from transformers.utils import cached_file

            found = cached_file(where, name, _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
        except (ImportError, OSError, ValueError):  # not a hub id at all: from_pretrained says so next
            found = None
        path = Path(found) if found else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"{where}: {name} is not readable JSON ({err}); repair or remove it") from err


def _three(value: object, where: str, key: str) -> list[float]:
    """An RGB statistic as three floats (a single number stands for all three channels)."""
    values = [value] * 3 if isinstance(value, (int, float)) else value
    if (not isinstance(values, (list, tuple)) or len(values) != 3
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
            or (key == "image_std" and min(values) <= 0)):
        raise InvalidInputError(f"{where}: {key} is {value!r}; expected three finite numbers (std above 0), "
                                "one per RGB channel")
    return [float(v) for v in values]


def text_ports(prefix: str, dim: int, entry_layers: Sequence[int], max_len: int) -> list[PortSpec]:
    """The input and entry ports of a transformer text tower of width ``dim``, its prompts ports included."""
    seq = ("B", "L")
    entry_layers = tuple(entry_layers)
    ports = [
        PortSpec(f"{prefix}.input_ids", PortKind.INPUT, seq, "int64", (Op.REPLACE,), prefix,
                 f"token ids from the backbone's tokenizer, at most {max_len} per row"),
        PortSpec(f"{prefix}.attention_mask", PortKind.INPUT, seq, "int64", (Op.REPLACE,), prefix,
                 "1 for real tokens, 0 for padding"),
        PortSpec(f"{prefix}.token_embeds", PortKind.INPUT, (*seq, dim), "float32",
                 (Op.ADD, Op.INSERT, Op.READ), prefix,
                 "token embeddings (the lookup rows); the lookup stays on the owner's side"),
    ]
    ports += [
        PortSpec(f"{prefix}.layer.{k}", PortKind.ENTRY, (*seq, dim), "float32",
                 (Op.ADD, Op.INSERT, Op.READ), prefix, f"hidden states entering transformer layer {k}")
        for k in entry_layers
    ]
    return ports + prompt_ports(prefix, "L", dim, entry_layers)


def prompt_ports(prefix: str, seq: str, dim: int, entry_layers: Sequence[int]) -> list[PortSpec]:
    """``<prefix>.prompts.k`` for each entry layer k: prompt tokens that take the places of the previous
    layer's instead of joining them (VPT-deep), on a tower whose ``<prefix>.layer.k`` take inserts.

    Args:
        seq: the name of the sequence dim (``L`` for text, ``N`` for image tokens).
        dim: the tower's width.

    A tower places them with a ``PromptSlots`` per forward. They came after adapters had been trained on
    every tower, so ``BackboneSpec.with_fingerprint`` leaves them out of the hash.
    """
    return [PortSpec(f"{prefix}.prompts.{k}", PortKind.ENTRY, ("B", seq, dim), "float32", (Op.INSERT,), prefix,
                     f"prompt tokens entering layer {k}: the first prompts port a request sends inserts them as "
                     f"an insert at {prefix}.layer.{k} would; each later one writes over those tokens (same K)")
            for k in entry_layers]


def add_delta(port: str, values: Tensor, delta: Tensor, mask: Tensor | None = None) -> Tensor:
    """``values + delta`` (broadcast), the delta kept off padding positions when ``mask`` is given."""
    try:
        torch.broadcast_shapes(delta.shape, values.shape)
    except RuntimeError:
        raise InvalidInputError(
            f"add at {port}: a delta of shape {list(delta.shape)} does not broadcast onto the "
            f"port's values of shape {list(values.shape)}; send a shape like "
            f"{[1] * (values.dim() - 1) + [values.shape[-1]]} or {list(values.shape)}"
        ) from None
    if mask is not None:
        delta = delta * mask.unsqueeze(-1).to(values.dtype)
    return values + delta


def insert_tokens(
    port: str, values: Tensor, mask: Tensor, tokens: Tensor, at: Tensor
) -> tuple[Tensor, Tensor]:
    """Place ``tokens`` in each row of ``values`` before position ``at[b]``.

    Args:
        values: ``[B, L, D]`` sequence.
        mask: ``[B, L]`` attention mask (1 real, 0 padding).
        tokens: ``[B or 1, K, D]`` tokens to insert.
        at: ``[B]`` insert position per row.

    Returns:
        ``[B, L+K, D]`` values and ``[B, L+K]`` mask (inserted tokens are real).
    """
    batch, length, dim = values.shape
    k = _token_count(port, values, tokens)
    joined = torch.cat([values, tokens.expand(batch, k, dim)], dim=1)  # [B, L+K, D]
    pos = torch.arange(length + k, device=values.device).unsqueeze(0)  # [1, L+K]
    at = at.to(values.device).unsqueeze(1)  # [B, 1]
    src = torch.where(pos < at, pos, torch.where(pos < at + k, length + pos - at, pos - k))
    new_values = joined.gather(1, src.unsqueeze(-1).expand(-1, -1, dim))
    new_mask = torch.cat([mask, mask.new_ones(batch, k)], dim=1).gather(1, src)
    return new_values, new_mask


def _token_count(port: str, values: Tensor, tokens: Tensor) -> int:
    """K of ``tokens`` ``[B or 1, K, D]`` sent to ``port``, whose ``values`` are ``[B, L, D]``."""
    batch, _, dim = values.shape
    if tokens.dim() != 3 or tokens.shape[0] not in (1, batch) or tokens.shape[2] != dim:
        raise InvalidInputError(
            f"insert at {port}: got tokens of shape {list(tokens.shape)}; expected "
            f"[1, K, {dim}] or [{batch}, K, {dim}]"
        )
    return int(tokens.shape[1])


def overwrite_tokens(port: str, values: Tensor, tokens: Tensor, at: Tensor) -> Tensor:
    """``values`` with positions ``at[b] .. at[b]+K-1`` of each row replaced by ``tokens``.

    Args:
        values: ``[B, L, D]`` sequence.
        tokens: ``[B or 1, K, D]`` tokens to write.
        at: ``[B]`` first position written per row (``at[b] + K <= L``).

    Returns:
        ``[B, L, D]`` values; what was at those positions gets no gradient.
    """
    batch, length, dim = values.shape
    k = _token_count(port, values, tokens)
    offset = torch.arange(length, device=values.device).unsqueeze(0) - at.to(values.device).unsqueeze(1)  # [B, L]
    if bool((offset[:, -1] < k - 1).any()):
        raise InvalidInputError(f"insert at {port}: {k} tokens written from positions {at.tolist()} pass the end "
                                f"of rows of {length} positions: the tower placed its prompts wrongly, a graytune "
                                "bug; please report it")
    inside = (offset >= 0) & (offset < k)  # [B, L]
    picked = offset.clamp(0, k - 1).unsqueeze(-1).expand(-1, -1, dim)  # [B, L, D] the token each position takes
    written = tokens.to(values.dtype).expand(batch, k, dim).gather(1, picked)  # [B, L, D]
    return torch.where(inside.unsqueeze(-1), written, values)


class PromptSlots:
    """Where one forward's prompt tokens sit in one tower (the ``<m>.prompts.k`` ports, VPT-deep).

    The first prompts port (in layer order) that gets tokens inserts them, as an insert at its
    ``<m>.layer.k`` would; each later one writes over those K positions, so the sequence keeps one block
    of prompts (L+K tokens) instead of growing by K per layer. A tower makes one per forward and sends
    its plain ``<m>.layer.k`` inserts through ``insert`` too, so the block is followed when they land
    before it. At one layer the plain insert goes first, then the prompts.

    Example:
        >>> prompts = PromptSlots()
        >>> for k, layer in enumerate(layers):
        ...     hidden, mask = prompts.place(f"text.layer.{k}", hidden, mask, insert, at=1)  # after [CLS]
    """

    def __init__(self) -> None:
        self.start: Tensor | None = None  # [B] first position of the block, once placed
        self.count = 0  # K
        self.placed_by = ""  # the prompts port that placed it

    def place(self, port: str, values: Tensor, mask: Tensor, insert: Mapping[str, Tensor],
              at: int) -> tuple[Tensor, Tensor]:
        """The tokens ``insert`` holds for ``port`` (a plain insert), then for its prompts port, each placed
        before position ``at`` of every row; a negative ``at`` counts from the end of the sequence as it
        stands when each is placed (-1: before the last position). Nothing is built when neither is sent.

        Towers whose insert position differs per row (CLIP's end token) call ``insert`` and ``take``.
        """
        if port in insert:
            values, mask = self.insert(port, values, mask, insert[port], _positions(values, at))
        if prompts_port(port) in insert:
            values, mask = self.take(port, values, mask, insert, _positions(values, at))
        return values, mask

    def insert(self, port: str, values: Tensor, mask: Tensor, tokens: Tensor, at: Tensor) -> tuple[Tensor, Tensor]:
        """``insert_tokens`` (a plain insert before ``at``), moving the block along where it lands before it."""
        values, mask = insert_tokens(port, values, mask, tokens, at)
        if self.start is not None:
            self.start = self.start + tokens.shape[1] * (at.to(self.start.device) <= self.start).long()
        return values, mask

    def take(self, layer_port: str, values: Tensor, mask: Tensor, insert: Mapping[str, Tensor],
             at: Tensor) -> tuple[Tensor, Tensor]:
        """The tokens ``insert`` holds for the prompts port beside ``layer_port``, if any: inserted before
        ``at`` when no block is placed yet, else written over the block (the mask unchanged).

        Raises:
            InvalidInputError: their K differs from the block's (the message names both ports).
        """
        port = prompts_port(layer_port)
        if port not in insert:
            return values, mask
        tokens = insert[port]
        if self.start is None:
            values, mask = insert_tokens(port, values, mask, tokens, at)
            self.start, self.count, self.placed_by = at.to(values.device), int(tokens.shape[1]), port
            return values, mask
        if tokens.dim() == 3 and tokens.shape[1] != self.count:
            raise InvalidInputError(
                f"insert at {port}: got {tokens.shape[1]} prompt tokens, but {self.placed_by} placed "
                f"{self.count} in this request; each later prompts port writes over the tokens the first one "
                f"placed, so every prompts port of a tower takes the same K: send {self.count} here (or insert at "
                f"{layer_port} to add tokens to the sequence)"
            )
        return overwrite_tokens(port, values, tokens, self.start), mask


def _positions(values: Tensor, at: int) -> Tensor:
    """``[B]``: position ``at`` of every row of ``values`` ``[B, L, D]`` (negative: counted from the end)."""
    return torch.full((len(values),), at if at >= 0 else values.shape[1] + at, dtype=torch.long,
                      device=values.device)


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` ``[B, L, D]`` over real tokens of ``mask`` ``[B, L]`` → ``[B, D]``."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
