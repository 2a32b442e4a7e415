"""Validation of everything a client sends to a port, before any compute.

Shared by the in-process handle and the server: the same request gets the same
answer wherever the boundary runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from graytune.access.topk import TOP_K_NAMES, plan_top_k
from graytune.errors import AccessDeniedError, InvalidInputError, UnknownNameError
from graytune.types import AccessLevel, BackboneSpec, Exposure, Op, PortKind, PortSpec, is_prompts_port, required_level

log = logging.getLogger(__name__)
Tensor = torch.Tensor
_DTYPES = {"float32": torch.float32, "int64": torch.int64}
_TOLD_CUT: set[tuple[str, str]] = set()  # (backbone id, modality) whose cut texts were logged at INFO once


def port_for(spec: BackboneSpec, name: str, op: Op, level: AccessLevel, with_grad: bool,
             grants: Collection[str] = ()) -> PortSpec:
    """The port ``name`` if ``op`` is allowed there at ``level``; a clear error otherwise.

    An unknown name is matched against the ports visible at ``level`` only, so the
    suggestions never name a port the caller's level hides.
    """
    try:
        port = spec.port(name)
    except UnknownNameError:
        raise UnknownNameError(f"port of backbone {spec.id!r}", name, spec.visible_at(level).port_names()) from None
    if op not in port.ops:
        allowed = ", ".join(o.value for o in port.ops)
        raise InvalidInputError(f"{op.value} is not possible at port {name} (it allows: {allowed})")
    needed = required_level(port.kind, op, with_grad)
    if level < needed:
        what = f"{op.value} at {name}" + (" with gradients" if with_grad and op is not Op.READ else "")
        raise AccessDeniedError(what, needed.label, level.label,
                                "ask the owner for a handle at that level, or adapt only the outputs")
    if op is Op.READ and port.kind is not PortKind.OUTPUT and name not in grants:
        held = ", ".join(sorted(grants)) or "no port"
        raise AccessDeniedError(
            f"read at {name}", f"an explicit grant (reads=[{name!r}])", f"{level.label} without that grant",
            message=(f"read at {name} needs an explicit grant by the owner (values read at input and inner ports "
                     f"reveal weights, so they are granted port by port); this handle at {level.label} holds reads "
                     f"at {held}; open the backbone with reads=[{name!r}] where the owner grants it (graytune serve "
                     f"--reads {name})"))
    return port


def check_tensor(port: PortSpec, value: object, op: Op, batch: int | None) -> Tensor:
    """Type, dtype, rank, fixed dims, batch size and finiteness of a tensor sent to ``port``."""
    where = f"{op.value} at {port.name}"
    if not isinstance(value, torch.Tensor):
        raise InvalidInputError(f"{where}: expected a torch.Tensor, got {type(value).__name__}")
    want = _DTYPES[port.dtype]
    if value.dtype != want:
        fix = ".float()" if want is torch.float32 else ".long()"
        raise InvalidInputError(f"{where}: dtype {str(value.dtype).removeprefix('torch.')} is not allowed; "
                                f"the port takes {port.dtype} (convert with {fix})")
    shape, expected = list(value.shape), list(port.shape)
    if op is Op.REPLACE:
        _check_dims(where, shape, expected, exact=True)
    elif op is Op.ADD:
        if value.dim() > len(expected):
            raise InvalidInputError(f"{where}: a delta of shape {shape} has more dims than the port {expected}")
        _check_dims(where, shape, expected[len(expected) - value.dim():], exact=False)
    elif op is Op.INSERT:
        if value.dim() != 3 or not isinstance(expected[-1], int) or shape[-1] != expected[-1]:
            raise InvalidInputError(f"{where}: got shape {shape}; insert takes [B or 1, K, {expected[-1]}] tokens")
    lead = shape[0] if value.dim() == len(expected) else 1
    if batch is not None and lead not in (1, batch) and op is not Op.REPLACE:
        raise InvalidInputError(f"{where}: batch dim {lead} does not match the inputs' batch of {batch}")
    if value.is_floating_point() and not all_finite(value):
        bad = int((~torch.isfinite(value)).sum())
        raise InvalidInputError(f"{where}: {bad} of {value.numel()} values are NaN or infinite; "
                                "send finite values (check the adapter or the data)")
    return value


def all_finite(value: Tensor) -> bool:
    """Whether every value is finite: one summing pass (a NaN or infinity makes the sum non-finite), and the
    exact element scan only when the sum is not finite (it can overflow on large finite values).

    ``isfinite(value).all()`` writes a boolean tensor as large as ``value`` first: on a batch of 32 images
    of 128 px that costs about 20x the sum (``scripts/boundary_ab.py`` times both).
    """
    if bool(torch.isfinite(value.sum())):
        return True
    return bool(torch.isfinite(value).all())


def _check_dims(where: str, shape: list[int], expected: list[object], exact: bool) -> None:
    if exact and len(shape) != len(expected):
        raise InvalidInputError(f"{where}: got shape {shape}, expected {expected} "
                                f"({len(expected)} dims, named ones free)")
    for got, want in zip(shape, expected):
        if isinstance(want, int) and got != want and not (not exact and got == 1):
            raise InvalidInputError(f"{where}: got shape {shape}, expected {expected}")


def check_token_inputs(spec: BackboneSpec, inputs: dict[str, Tensor], prefix: str) -> None:
    """Fill a missing attention mask; check ids are in the vocabulary and masks are 0/1."""
    ids_key, mask_key = f"{prefix}.input_ids", f"{prefix}.attention_mask"
    ids = inputs[ids_key]
    mask = inputs.setdefault(mask_key, torch.ones_like(ids))
    if mask.shape != ids.shape:
        raise InvalidInputError(f"{mask_key} has shape {list(mask.shape)} but {ids_key} has {list(ids.shape)}")
    vocab = spec.preprocess.get(prefix, {}).get("vocab_size")
    if ids.numel() and (int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab)):
        raise InvalidInputError(f"{ids_key}: ids must lie in [0, {vocab}); got {int(ids.min())}..{int(ids.max())}; "
                                "use the handle's tokenize()")
    if not bool(((mask == 0) | (mask == 1)).all()) or bool((mask.sum(1) == 0).any()):
        raise InvalidInputError(f"{mask_key}: must be 0/1 with at least one real token per row")
    if f"{prefix}.target_ids" in inputs:
        check_targets(inputs[f"{prefix}.target_ids"], ids, vocab, prefix)


def check_targets(targets: Tensor, ids: Tensor, vocab: int | None, prefix: str) -> None:
    """``<prefix>.target_ids`` ``[B, L]`` (a causal LM's): one per input position, each in the vocabulary or -100.

    Raises:
        InvalidInputError: another shape than the ids' (e.g. targets longer than the input), or an id outside
            ``[0, vocab)`` that is not -100; the message names what was received and what is allowed.
    """
    key, ids_key = f"{prefix}.target_ids", f"{prefix}.input_ids"
    if targets.shape != ids.shape:
        longer = " (targets longer than the input)" if targets.dim() == 2 and targets.shape[1] > ids.shape[1] else ""
        raise InvalidInputError(f"{key} has shape {list(targets.shape)} but {ids_key} has {list(ids.shape)}{longer}; "
                                f"send one target per input position: the id to predict after reading tokens 0..t, "
                                "-100 where there is none (a completion's ids shifted left by one, -100 over the "
                                "prompt)")
    bad = (targets != -100) & ((targets < 0) | (targets >= (vocab if vocab is not None else 1 << 62)))
    if bool(bad.any()):
        got = sorted({int(t) for t in targets[bad][:5]})
        raise InvalidInputError(f"{key}: ids must lie in [0, {vocab}) or be -100 (no target); got {got}; "
                                "build them from the handle's tokenize() ids")


def check_context(spec: BackboneSpec, inputs: Mapping[str, Tensor], insert: Mapping[str, Tensor],
                  prefix: str) -> bool:
    """For a backbone whose positions line up with targets (its spec has ``<prefix>.target_ids``: a causal
    LM), nothing may be cut: each row's real tokens plus every token inserted at its ports (a prompts
    block counted once) must fit ``preprocess[prefix]["max_positions"]``. Padding takes no position there.

    Returns:
        Whether ``prefix`` is such a modality (then ``reserve_for_inserts`` must leave its ids alone).

    Raises:
        InvalidInputError: a row over that limit; the message names its length, the inserted tokens and the limit.
    """
    limit = spec.preprocess.get(prefix, {}).get("max_positions")
    if f"{prefix}.target_ids" not in spec.port_names() or not isinstance(limit, int):
        return False
    mask = inputs[f"{prefix}.attention_mask"]
    longest = int(mask.sum(1).max())
    sizes = [(name, int(t.shape[1])) for name, t in insert.items() if name.startswith(f"{prefix}.") and t.dim() == 3]
    inserted = sum(k for name, k in sizes if not is_prompts_port(name))
    inserted += max([k for name, k in sizes if is_prompts_port(name)], default=0)
    if longest + inserted > limit:
        raise InvalidInputError(
            f"{prefix}.input_ids: a row of {longest} tokens plus {inserted} inserted tokens needs "
            f"{longest + inserted} positions; this model's context is {limit} positions and nothing is cut (the "
            f"positions line up with {prefix}.target_ids); send at most {max(limit - inserted, 0)} tokens per row"
            + (" or insert fewer tokens" if inserted else ""))
    return True


def reserve_for_inserts(spec: BackboneSpec, inputs: dict[str, Tensor], add: Mapping[str, Tensor],
                        prefix: str, inserted: int) -> None:
    """Make room for ``inserted`` tokens at ``<prefix>.token_embeds`` in the backbone's positions.

    The limit is ``spec.preprocess[prefix]["max_positions"]``, else its ``max_tokens``. When the
    ids' width plus ``inserted`` passes it, the ids and mask are shortened in place to
    ``limit - inserted`` columns: trailing padding goes first, then each row still too long
    loses the real tokens just before its last real token, so its start token and the end
    token that pooling reads are kept (``preprocess[prefix]["long_texts"]`` tells clients).
    Short texts are left exactly as they are. The same ids give the same cut whether the
    texts came as strings or as ids from ``tokenize``.

    Raises:
        InvalidInputError: the inserted tokens leave no room for a start and an end token; a
            per-position ``add`` at this modality would no longer line up with the cut rows; or
            a row that must be cut is padded on the left.
    """
    ids_key, mask_key = f"{prefix}.input_ids", f"{prefix}.attention_mask"
    pre = spec.preprocess.get(prefix, {})
    limit = pre.get("max_positions", pre.get("max_tokens"))
    ids, mask = inputs[ids_key], inputs[mask_key]
    width = ids.shape[1]
    if not isinstance(limit, int) or width + inserted <= limit:
        return
    room = limit - inserted  # the columns left for the text
    if room < 2:
        raise InvalidInputError(
            f"insert at {prefix}.token_embeds: {inserted} tokens leave no room for a text in this backbone's "
            f"{limit} positions (its start and end tokens need 2); insert at most {limit - 2} tokens there"
        )
    cols = torch.arange(width, device=ids.device)  # [L]
    real = mask != 0  # [B, L]
    last = torch.where(real, cols, -1).amax(1)  # [B] position of each row's last real token
    first = torch.where(real, cols, width).amin(1)  # [B]
    cut = (last + 1 - room).clamp_min(0)  # [B] real tokens to drop before the last one
    start = last - cut  # [B] where the dropped run begins
    if bool(((cut > 0) & (first >= start)).any()):
        raise InvalidInputError(f"{ids_key}: a row that must be cut to make room for {inserted} inserted tokens "
                                "is padded on the left; send right-padded ids, as the handle's tokenize() gives")
    cut_rows = [int(b) for b in torch.nonzero(cut).flatten()]
    if cut_rows:
        per_position = [name for name, delta in add.items() if name.startswith(f"{prefix}.")
                        and delta.dim() >= 2 and delta.shape[-2] != 1]
        if per_position:
            raise InvalidInputError(
                f"rows {cut_rows} of {ids_key} are cut to {room} tokens to make room for {inserted} tokens inserted "
                f"at {prefix}.token_embeds, so the per-position add at {', '.join(per_position)} no longer lines "
                f"up; send texts of at most {room} tokens, or deltas of shape [B or 1, 1, D]"
            )
        first_time = (spec.id, prefix) not in _TOLD_CUT
        _TOLD_CUT.add((spec.id, prefix))
        log.log(logging.INFO if first_time else logging.DEBUG,
                "%s: %d of %d texts cut just before their end token to %d tokens, making room for %d inserted "
                "tokens in %d positions (spec.preprocess[%r]['long_texts'])", spec.id, len(cut_rows), len(ids),
                room, inserted, limit, prefix)
    j = torch.arange(room, device=ids.device).unsqueeze(0)  # [1, room]
    src = torch.where(j < start.unsqueeze(1), j, j + cut.unsqueeze(1))  # [B, room] source column of each kept one
    inputs[ids_key], inputs[mask_key] = ids.gather(1, src), mask.gather(1, src)


def batch_size(inputs: Mapping[str, Tensor]) -> int:
    """The common batch size of the input tensors; an error if they disagree."""
    sizes = {name: int(t.shape[0]) for name, t in inputs.items()}
    if len(set(sizes.values())) > 1:
        raise InvalidInputError(f"inputs disagree on batch size: {sizes}")
    if not sizes:
        raise InvalidInputError("no inputs given; send at least one input port (see the handle's spec)")
    batch = next(iter(sizes.values()))
    if batch == 0:
        shapes = ", ".join(f"{name} {list(t.shape)}" for name, t in inputs.items())
        raise InvalidInputError(f"the inputs hold 0 rows ({shapes}); send at least one row")
    return batch


def unknown_input(spec: BackboneSpec, name: str) -> UnknownNameError:
    allowed = [p.name for p in spec.ports if p.kind is PortKind.INPUT and Op.REPLACE in p.ops]
    if "text" in spec.modalities:
        allowed.append("text")
    return UnknownNameError("input", name, allowed,
                            "inputs take replace ports; use add= or insert= for edits")


@dataclass
class CallPlan:
    """One checked request to the boundary: what to run, and which client tensors want gradients."""

    inputs: dict[str, Tensor]
    add: dict[str, Tensor]
    insert: dict[str, Tensor]
    outputs: list[str]
    reads: list[str]
    slots: list[tuple[str, str]]  # (group, port) of each differentiable client tensor
    batch: int = 0  # rows of the call (what a VJP of it reveals)
    top_k: int = 0  # the next tokens read per position (``reads`` then ends with ``topk.TOP_K_NAMES``)

    def tensor(self, group: str, port: str) -> Tensor:
        return {"inputs": self.inputs, "add": self.add, "insert": self.insert}[group][port]


def plan_call(spec: BackboneSpec, level: AccessLevel, grants: Collection[str], exposure: Exposure,
              tokenize: Callable[[list[str]], dict[str, Tensor]],
              raw_inputs: Mapping[str, Tensor | Sequence[str]], add: Mapping[str, Tensor],
              insert: Mapping[str, Tensor], outputs: Sequence[str] | None, reads: Sequence[str], *,
              top_k: int = 0, top_k_grant: int = 0) -> CallPlan:
    """Check a request against ``spec`` at ``level`` and note it in ``exposure``; nothing runs yet.

    ``top_k``: a language model's next tokens to read, at most the owner's ``top_k_grant`` (``access.topk``).

    The in-process handle, the remote client and the server all call this, so the
    same request gets the same answer wherever the boundary runs. Under ``torch.no_grad()``
    no client tensor asks for a gradient, so the backbone keeps no graph. Texts too long to
    hold the tokens inserted at ``<modality>.token_embeds`` are cut (``reserve_for_inserts``).
    """
    grad_mode = torch.is_grad_enabled()
    inputs: dict[str, Tensor] = {}
    for name, value in raw_inputs.items():
        if name == "text" and "text" in spec.modalities:
            inputs.update(tokenize(texts_of(value)))  # type: ignore[arg-type]
            continue
        if name not in spec.port_names(PortKind.INPUT) or Op.REPLACE not in spec.port(name).ops:
            raise unknown_input(spec, name)
    for name, value in raw_inputs.items():
        if name != "text":
            grad = isinstance(value, Tensor) and value.requires_grad and grad_mode
            inputs[name] = check_tensor(port_for(spec, name, Op.REPLACE, level, grad), value, Op.REPLACE, None)
    for prefix in spec.modalities:
        if f"{prefix}.input_ids" in inputs:
            check_token_inputs(spec, inputs, prefix)
    batch = batch_size(inputs)
    slots = [("inputs", n) for n, t in inputs.items() if t.requires_grad and grad_mode]
    edited = []  # input ports edited at black-box (no gradient there): what finite differences need
    for op, group in ((Op.ADD, add), (Op.INSERT, insert)):
        for name, value in group.items():
            port = port_for(spec, name, op, level, isinstance(value, Tensor) and value.requires_grad and grad_mode)
            check_tensor(port, value, op, batch)
            if not any(k.startswith(port.modality + ".") for k in inputs):
                raise InvalidInputError(f"{op.value} at {name}: no {port.modality} input was sent")
            exposure.note(port, op)
            if value.requires_grad and grad_mode:
                slots.append(("add" if op is Op.ADD else "insert", name))
            if level is AccessLevel.BLACK_BOX and port.kind is PortKind.INPUT and name not in edited:
                edited.append(name)
    for prefix in spec.modalities:
        if f"{prefix}.input_ids" not in inputs or check_context(spec, inputs, insert, prefix):
            continue
        if f"{prefix}.token_embeds" in insert:
            reserve_for_inserts(spec, inputs, add, prefix, int(insert[f"{prefix}.token_embeds"].shape[1]))
    top = plan_top_k(spec, top_k_grant, top_k, inputs, reads, exposure)
    for name in reads:
        exposure.note(port_for(spec, name, Op.READ, level, False, grants), Op.READ)
    outputs = _outputs(spec, level, inputs, outputs)
    for name in [*inputs, *outputs]:
        exposure.note(spec.port(name), Op.READ if name in outputs else Op.REPLACE)
    exposure.forward_queries += 1
    exposure.forward_samples += batch
    if edited:
        exposure.note_black_box_edits(edited, batch)
    return CallPlan(inputs, dict(add), dict(insert), outputs, [*reads, *top], slots, batch, top_k if top else 0)


def _outputs(spec: BackboneSpec, level: AccessLevel, inputs: Mapping[str, Tensor],
             asked: Sequence[str] | None) -> list[str]:
    modalities = {name.split(".")[0] for name in inputs}
    available = [p.name for p in spec.ports if p.kind is PortKind.OUTPUT and (p.modality in modalities)
                 and p.name not in TOP_K_NAMES]  # read with top_k=, never an output
    chosen = available if asked is None else list(asked)
    for name in [] if asked is None else asked:
        port_for(spec, name, Op.READ, level, False)
        if name in TOP_K_NAMES:
            raise InvalidInputError(f"outputs=[{name!r}]: the most likely next tokens are asked with top_k=k (e.g. "
                                    f"forward(..., top_k=5)), which returns {' and '.join(TOP_K_NAMES)}")
        if name not in available:
            raise InvalidInputError(f"output {name} needs {spec.port(name).modality} "
                                    f"inputs; this call sent {sorted(inputs)}")
    for name in chosen:  # a causal LM's log-probabilities of targets need the targets
        targets = f"{spec.port(name).modality}.target_ids"
        if name.endswith(".target_logprobs") and targets not in inputs:
            raise InvalidInputError(f"output {name} needs {targets} (one target id per input position, -100 where "
                                    f"none); this call sent {sorted(inputs)}; send them, or ask other outputs "
                                    "(outputs=[] with reads=[...] for values read alone)")
    return chosen


def texts_of(texts: object) -> list[str]:
    """``texts`` as a non-empty list of strings; a clear error otherwise."""
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise InvalidInputError("text input must be a list of strings, e.g. ['a cat', 'a dog']")
    if not texts:
        raise InvalidInputError("text input is empty; send at least one string")
    for index, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InvalidInputError(f"text {index} holds {text[err.start]!r} at character {err.start}, a lone UTF-16 "
                                    "surrogate that is not Unicode text; send valid UTF-8 (e.g. decode your data "
                                    "with errors='replace')") from None
    return list(texts)


def client_device(plan: CallPlan, default: torch.device | None) -> torch.device | None:
    """Where a call's results go: the device of the client's first floating tensor, else ``default``."""
    for group in (plan.inputs, plan.add, plan.insert):
        for tensor in group.values():
            if tensor.is_floating_point():
                return tensor.device
    return default
