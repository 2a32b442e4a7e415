"""Files the library reads from the system: Debian data packages and bundled lists.

Installed files are found with ``dpkg -L``, never a hard-coded path, so the
same code works wherever Debian put them. A missing package raises
``MissingDependencyError`` naming the ``apt-get`` line that installs it.

Example:
    >>> names = imagenet_class_names()  # 1000 names, in ImageNet-1k index order
    >>> names[285]
    'Egyptian cat'
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from graytune.errors import MissingDependencyError

#: Debian packages holding the real data sets (DESIGN.md §6).
DATA_PACKAGES = (
    "dataset-fashion-mnist",
    "wordnet-base",
    "fonts-noto-color-emoji",
    "fortunes",
    "tuxpaint-stamps-default",
)


def debian_files(package: str, suffix: str = "") -> list[Path]:
    """Files installed by Debian ``package`` whose path ends with ``suffix``.

    Raises:
        MissingDependencyError: the package (or dpkg itself) is not there.
    """
    env_dir = os.environ.get("GRAYTUNE_DATA_" + package.upper().replace("-", "_"))
    if env_dir:  # for machines without dpkg: point at an unpacked copy
        return sorted(p for p in Path(env_dir).rglob("*") if p.is_file() and str(p).endswith(suffix))
    if shutil.which("dpkg") is None:
        raise MissingDependencyError(
            f"dpkg is not available to find the files of Debian package {package!r}; "
            f"install it on a Debian-like system (apt-get install {package}) or set "
            f"GRAYTUNE_DATA_{package.upper().replace('-', '_')} to a folder holding its files"
        )
    proc = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise MissingDependencyError(
            f"Debian package {package!r} is not installed; install it with "
            f"'apt-get install -y {package}' (as root, after apt-get update), or run "
            "'make demo' / 'make test', which install it"
        )
    return [Path(p) for p in proc.stdout.split("\n") if p.endswith(suffix) and Path(p).is_file()]


def debian_file(package: str, suffix: str) -> Path:
    """The one file of ``package`` ending with ``suffix``."""
    found = debian_files(package, suffix)
    if len(found) != 1:
        raise MissingDependencyError(
            f"expected one file ending {suffix!r} in Debian package {package!r}, found {len(found)}"
        )
    return found[0]


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids, in class-index order (sorted ids)."""
    text = resources.files(__package__).joinpath("imagenet_wnids.txt").read_text()
    return tuple(text.split())


@functools.cache
def wordnet_nouns() -> dict[str, tuple[int, tuple[str, ...], str]]:
    """WordNet 3.0 noun synsets: ``wnid -> (lexfile number, lemmas, definition)``.

    Read from Debian ``wordnet-base``. The lexfile number 3..28 is the
    supersense (noun.Tops .. noun.time).
    """
    path = debian_file("wordnet-base", "/data.noun")
    synsets: dict[str, tuple[int, tuple[str, ...], str]] = {}
    with open(path, encoding="latin-1") as fh:
        for line in fh:
            if line.startswith("  "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            count = int(fields[3], 16)
            lemmas = tuple(fields[4 + 2 * i].replace("_", " ") for i in range(count))
            synsets["n" + fields[0]] = (int(fields[1]), lemmas, gloss.split(";")[0].strip())
    return synsets


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
    """A readable name for each ImageNet-1k class: its first WordNet lemma."""
    nouns = wordnet_nouns()
    return tuple(nouns[wnid][1][0] for wnid in imagenet_wnids())
