"""The artifact format on disk, one for every method: ``adapter_config.json`` + ``adapter_model.safetensors``.

The layout is PEFT's. The config describes the artifact completely (library and
format version, method and kind, every adapter with its resolved options, the
access level and read grants used, the backbone id and fingerprint, the
preprocessing, class lists, the exposure record), so loading never needs a flag
given at training time. Tensors are safetensors, never pickle. Each file is written
atomically (a temporary file renamed into place); nothing else in the folder is touched.

This module knows files, not models: ``AdaptedModel.save_pretrained`` and the
TransMiter recipe build on it.

Example:
    >>> write_artifact("out/a", {"method": "dga", ...}, {"image_adapters.0.convs.0.weight": w})
    >>> config, tensors = read_config("out/a"), read_weights("out/a")
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from graytune.errors import ArtifactError
from graytune.types import BackboneSpec

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 2
"""2: every adapter's resolved options, the kind, the preprocessing and white-box settings are recorded."""


def library_version() -> str:
    """The installed graytune's version (recorded in every artifact)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("graytune")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def write_artifact(folder: str | os.PathLike[str], config: Mapping[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write ``config`` (the library and format fields added) and ``tensors`` into ``folder``.

    Only the artifact's two files are written, each atomically (a temporary file renamed into
    place), tensors first and config last; the config records the tensors' SHA-256, so a reader
    never pairs a new config with old tensors unnoticed. Nothing else in ``folder`` is touched.
    """
    from safetensors.torch import save_file

    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    weights = replace_atomically(target / WEIGHTS_NAME, lambda path: save_file(state, str(path),
                                                                              metadata={"format": "pt"}))
    full = {"library": "graytune", "library_version": library_version(), "format_version": FORMAT_VERSION,
            **config, "weights_sha256": file_sha256(weights)}
    text = json.dumps(full, indent=2, sort_keys=True, default=_plain)
    replace_atomically(target / CONFIG_NAME, lambda path: path.write_text(text))
    return target


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | set | frozenset):
        return sorted(value) if isinstance(value, set | frozenset) else list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def replace_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` through ``write(temporary path)`` and rename it into place: readers see old or new.

    The file gets the permissions any new file gets under the process's umask (0644 under the usual 022),
    as ``open`` would give it; ``tempfile.mkstemp``'s 0600 would hide a shared run from its team.
    """
    tmp = _new_file(path.parent, f".{path.name}.", ".tmp")
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0666 less the umask, as the system created it
        write(Path(tmp))
        os.chmod(tmp, mode)  # a writer that replaces the file itself (safetensors does) made it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _new_file(folder: Path, prefix: str, suffix: str) -> str:
    """An empty file of a new unique name in ``folder``, created with mode 0666 less the umask."""
    for _ in range(100):
        name = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return name
    raise FileExistsError(f"no free temporary file name in {folder}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The artifact's config; a clear error when the folder is not an artifact or is too new."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a graytune adapter: {CONFIG_NAME} is missing; "
                            "give the --out folder of 'graytune train'")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is damaged ({err}); train again or restore it") from err
    if not isinstance(config, dict) or config.get("library") != "graytune" \
            or not isinstance(config.get("format_version", 0), int) or config.get("format_version", 0) > FORMAT_VERSION:
        found = config.get("format_version") if isinstance(config, dict) else None
        raise ArtifactError(f"{path}: format {found} is not one this graytune {library_version()} reads "
                            f"(graytune artifacts of format <= {FORMAT_VERSION}); upgrade graytune to read it")
    return config


def read_weights(folder: str | os.PathLike[str], config: Mapping[str, Any] | None = None,
                 ) -> dict[str, torch.Tensor]:
    """The artifact's tensors; a clear error when the file is missing, damaged, or not the one ``config``
    (read from ``folder`` when not given) was written with."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise ArtifactError(f"{folder}: {WEIGHTS_NAME} is missing; the artifact is incomplete")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"{path} is damaged or truncated ({err}); train again, or restore the folder from a "
                            "copy") from None
    expected = (read_config(folder) if config is None else config).get("weights_sha256")
    if expected and expected != file_sha256(path):
        raise ArtifactError(f"{path} is not the file {CONFIG_NAME} was written with (its SHA-256 differs): the "
                            "folder was changed by hand or a save was interrupted; train again or restore it")
    return tensors


def check_fingerprint(config: Mapping[str, Any], spec: BackboneSpec, folder: str | os.PathLike[str],
                      hint: str = "open the backbone it was trained on") -> None:
    """``ArtifactError`` naming both backbones when ``spec`` is not the one the artifact was made on."""
    if config.get("fingerprint") != spec.fingerprint:
        raise ArtifactError(
            f"adapter in {folder} was trained on backbone {config.get('backbone')!r} (fingerprint "
            f"{str(config.get('fingerprint'))[:16]}…), but this handle is {spec.id!r} (fingerprint "
            f"{spec.fingerprint[:16]}…); {hint}")
