"""Memory the server gives back: glibc's allocator held to a few arenas, large blocks mapped and returned.

A request's tensors are allocated on whichever thread runs it, and glibc gives each thread an arena
of its own (up to 8 per core) and keeps freed blocks under 32 MiB in the arena instead of returning
them: eight concurrent worst-case gradient requests against ``graytune serve minilm`` (each +1.1 GB
when admitted alone) took the server to a peak RSS of 6.4 GB, then 8.0 GB on a second round, and it
stayed at 7.5 GB idle (2 cores; docs/reliability.md). ``tame_allocator`` sets, for this process and
the workers it starts:

- at most ``arenas`` arenas (glibc's ``M_ARENA_MAX``, what ``MALLOC_ARENA_MAX`` sets);
- a fixed threshold above which blocks are mapped on their own and unmapped when freed
  (``M_MMAP_THRESHOLD``; fixing it also stops glibc from raising it after each large free).

``trim`` hands back what the arenas still hold once the backbone is idle (``malloc_trim``). With both,
the same run peaked at 1.4 GB and idled at 0.55 GB. Elsewhere than glibc (macOS, musl) these do nothing.

Example:
    >>> tame_allocator(arenas=2, mmap_threshold_kb=1024)   # before the backbone loads and threads start
    True
    >>> trim()                                              # when no request is running
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # mallopt parameters (malloc.h)
_LIBC: list[Any] = []  # the loaded C library, once looked up (None where it is not glibc)


def _glibc() -> Any:
    if not _LIBC:
        libc = None
        if sys.platform.startswith("linux"):
            try:
                candidate = ctypes.CDLL("libc.so.6")
                if all(hasattr(candidate, name) for name in ("mallopt", "malloc_trim", "gnu_get_libc_version")):
                    libc = candidate
            except OSError:
                libc = None
        _LIBC.append(libc)
    return _LIBC[0]


def tame_allocator(arenas: int, mmap_threshold_kb: int) -> bool:
    """Hold glibc to ``arenas`` arenas and map blocks of ``mmap_threshold_kb`` KiB and more on their own.

    Call it where the server starts, before the backbone loads: arenas already made are kept. The same
    settings go into the environment (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``) for worker
    processes started later. A value of 0 leaves that setting to glibc. Returns whether glibc took them.
    """
    libc = _glibc()
    if libc is None:
        log.info("not glibc: the allocator settings (--malloc-arenas, --malloc-mmap-kb) do nothing here")
        return False
    done = True
    if arenas > 0:
        os.environ.setdefault("MALLOC_ARENA_MAX", str(arenas))
        done = bool(libc.mallopt(_M_ARENA_MAX, ctypes.c_int(arenas))) and done
    if mmap_threshold_kb > 0:
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(mmap_threshold_kb * 1024))
        done = bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold_kb * 1024))) and done
    if not done:
        log.warning("glibc refused the allocator settings (--malloc-arenas %d, --malloc-mmap-kb %d)", arenas,
                    mmap_threshold_kb)
    return done


def trim() -> None:
    """Return the free memory every arena holds to the system (glibc's ``malloc_trim(0)``; elsewhere nothing)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(ctypes.c_size_t(0))
