"""Where tensors live and in which precision: parsing ``--device`` and ``--dtype`` once for every layer.

Example:
    >>> parse_dtype("bf16")
    torch.bfloat16
    >>> parse_device(None)          # CUDA when present, else CPU
    device(type='cpu')
"""

from __future__ import annotations

import torch

from graytune.errors import InvalidInputError

#: every spelling ``--dtype`` accepts, and the dtype it means
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
#: the short name of each dtype, as graytune writes it in specs, reports and artifacts
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def parse_dtype(value: torch.dtype | str | None) -> torch.dtype:
    """A torch dtype from a dtype or its name (``bf16``/``bfloat16``, ``fp16``, ``fp32``); ``None`` is fp32."""
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        if value in DTYPE_NAMES:
            return value
        raise InvalidInputError(f"dtype {value} is not supported for a backbone; use one of "
                                f"{', '.join(sorted(set(DTYPE_NAMES.values())))}")
    key = str(value).strip().lower().removeprefix("torch.")
    if key in DTYPES:
        return DTYPES[key]
    raise InvalidInputError(f"unknown dtype {value!r}; use one of {', '.join(DTYPES)} (e.g. bf16 on a recent GPU)")


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32``, ``bf16`` or ``fp16``."""
    return DTYPE_NAMES[dtype]


def parse_device(value: torch.device | str | None) -> torch.device:
    """A torch device from a device or its name (``cpu``, ``cuda``, ``cuda:1``); ``None``/``auto``: CUDA when present.

    Raises:
        InvalidInputError: an unknown name, or a CUDA device this machine does not have.
    """
    if value is None or value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = value if isinstance(value, torch.device) else torch.device(str(value).strip())
    except RuntimeError:
        raise InvalidInputError(f"unknown device {value!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise InvalidInputError(f"device {value!r} asks for CUDA, and this machine has no CUDA device "
                                    "(or this torch was built without CUDA); use --device cpu")
        if device.index is not None and device.index >= count:
            raise InvalidInputError(f"device {value!r}: this machine has {count} CUDA device(s), "
                                    f"cuda:0..cuda:{count - 1}")
    elif device.type not in ("cpu", "mps"):
        raise InvalidInputError(f"device {value!r} is not supported; use cpu, cuda or cuda:N")
    return device


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` (the current device) count as one device."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
