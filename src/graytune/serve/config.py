"""The server's settings, API keys and per-client quotas.

Example:
    >>> keys = ApiKeys.load("keys.txt")     # lines of "client-name secret-key"
    >>> keys.client("Bearer s3cret")        # 'alice', or None for an unknown key
"""

from __future__ import annotations

import hmac
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from graytune.errors import InvalidInputError


@dataclass
class ServeConfig:
    """How the owner lends the backbone (``graytune serve`` flags)."""

    access: str = "dark-gray"
    """Highest level clients get: black-box, dark-gray or light-gray (white-box never crosses a network)."""
    reads: tuple[str, ...] = ()
    """Input or entry ports whose values clients may read (e.g. text.token_embeds for AdaLink)."""
    host: str = "127.0.0.1"
    """Interface to bind; the default keeps the service on this machine."""
    port: int = 8470
    """TCP port."""
    max_body_mb: float = 64.0
    """Largest request body accepted, in MiB (413 above)."""
    request_timeout_s: float = 60.0
    """Longest a request may wait for and use the backbone (503/504 after)."""
    session_ttl_s: float = 120.0
    """How long a forward's state waits for its VJP."""
    session_budget_mb: float = 2048.0
    """Total memory for pending sessions, in MiB; the least recently used go first."""
    client_sessions: int = 64
    """Most pending sessions per client."""
    client_session_mb: float = 1024.0
    """Most session memory per client, in MiB."""
    quota_samples: int = 0
    """Samples each client may send through the backbone (0: no limit)."""
    quota_vjp: int = 0
    """VJP calls each client may make (0: no limit)."""
    max_texts: int = 4096
    """Most strings in one tokenize or embed request."""
    adapters: tuple[str, ...] = ()
    """Trained adapters to host, as NAME=FOLDER (answered at /v1/adapters/NAME/...)."""
    batch_window_ms: float = 5.0
    """How long the adapter batcher waits to fill a batch."""
    max_batch: int = 256
    """Most samples in one batched backbone call for hosted adapters."""
    workers: int = 1
    """uvicorn worker processes (each keeps its own sessions; clients recover by recomputation)."""


class ApiKeys:
    """Client names by API key; keys are compared in constant time."""

    def __init__(self, keys: dict[str, str]) -> None:
        if not keys:
            raise InvalidInputError("no API keys given; write lines of 'client-name secret-key' to the keys file")
        short = [name for name, key in keys.items() if len(key) < 16]
        if short:
            raise InvalidInputError(f"API keys of {', '.join(short)} are shorter than 16 characters; "
                                    "use e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        self._keys = [(name, key.encode()) for name, key in keys.items()]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ApiKeys:
        """Read ``client-name secret-key`` lines (``#`` starts a comment)."""
        file = Path(path)
        if not file.is_file():
            raise InvalidInputError(f"API key file {file} does not exist; write lines of 'client-name secret-key'")
        keys: dict[str, str] = {}
        for number, line in enumerate(file.read_text().splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) != 2 or words[0] in keys:
                raise InvalidInputError(f"{file}:{number}: expected 'client-name secret-key' with a new name, "
                                        f"got {len(words)} fields")
            keys[words[0]] = words[1]
        return cls(keys)

    def client(self, authorization: str | None) -> str | None:
        """The client named by an ``Authorization: Bearer KEY`` header, or ``None``."""
        scheme, _, given = (authorization or "").partition(" ")
        token = given.strip().encode() if scheme.lower() == "bearer" else b""
        found = None
        for name, key in self._keys:  # every key is compared, so timing says nothing about which matched
            if hmac.compare_digest(token, key) and token:
                found = name
        return found


class QuotaExceeded(Exception):
    """A client went past its sample or VJP quota (answered with 429)."""


@dataclass
class Quotas:
    """Samples and VJP calls per client, counted since the server started."""

    samples: int = 0
    vjp: int = 0
    used: dict[str, list[int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def charge(self, client: str, samples: int = 0, vjp: int = 0) -> None:
        with self._lock:
            used = self.used.setdefault(client, [0, 0])
            if self.samples and used[0] + samples > self.samples:
                raise QuotaExceeded(f"sample quota of {self.samples} reached ({used[0]} used, {samples} asked)")
            if self.vjp and used[1] + vjp > self.vjp:
                raise QuotaExceeded(f"VJP quota of {self.vjp} calls reached")
            used[0] += samples
            used[1] += vjp
