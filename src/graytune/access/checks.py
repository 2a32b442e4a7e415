"""Validation of everything a client sends to a port, before any compute.

Shared by the in-process handle and the server: the same request gets the same
answer wherever the boundary runs.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

from graytune.errors import AccessDeniedError, InvalidInputError, UnknownNameError
from graytune.types import AccessLevel, BackboneSpec, Op, PortKind, PortSpec, required_level

Tensor = torch.Tensor
_DTYPES = {"float32": torch.float32, "int64": torch.int64}


def port_for(spec: BackboneSpec, name: str, op: Op, level: AccessLevel, with_grad: bool,
             grants: Collection[str] = ()) -> PortSpec:
    """The port ``name`` if ``op`` is allowed there at ``level``; a clear error otherwise."""
    port = spec.port(name)
    if op not in port.ops:
        allowed = ", ".join(o.value for o in port.ops)
        raise InvalidInputError(f"{op.value} is not possible at port {name} (it allows: {allowed})")
    needed = required_level(port.kind, op, with_grad)
    if level < needed:
        what = f"{op.value} at {name}" + (" with gradients" if with_grad and op is Op.REPLACE else "")
        raise AccessDeniedError(what, needed.label, level.label,
                                "ask the owner for a handle at that level, or adapt only the outputs")
    if op is Op.READ and port.kind is not PortKind.OUTPUT and name not in grants:
        raise AccessDeniedError(
            f"read at {name}", f"an explicit grant (reads=[{name!r}])", f"{level.label} without that grant",
            "reading input or inner values reveals weights, so the owner grants it port by port",
        )
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
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise InvalidInputError(f"{where}: {bad} of {value.numel()} values are NaN or infinite; "
                                "send finite values (check the adapter or the data)")
    return value


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


def batch_size(inputs: Mapping[str, Tensor]) -> int:
    """The common batch size of the input tensors; an error if they disagree."""
    sizes = {name: int(t.shape[0]) for name, t in inputs.items()}
    if len(set(sizes.values())) > 1:
        raise InvalidInputError(f"inputs disagree on batch size: {sizes}")
    if not sizes:
        raise InvalidInputError("no inputs given; send at least one input port (see the handle's spec)")
    return next(iter(sizes.values()))


def unknown_input(spec: BackboneSpec, name: str) -> UnknownNameError:
    allowed = [p.name for p in spec.ports if p.kind is PortKind.INPUT and Op.REPLACE in p.ops]
    if "text" in spec.modalities:
        allowed.append("text")
    return UnknownNameError("input", name, allowed,
                            "inputs take replace ports; use add= or insert= for edits")
