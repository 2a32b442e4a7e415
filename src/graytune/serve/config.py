"""The server's settings and API keys (quotas live in ``graytune.serve.ledger``).

Example:
    >>> keys = ApiKeys.load("keys.txt")     # lines of "client-name secret-key"
    >>> keys.client("Bearer s3cret")        # 'alice', or None for an unknown key
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from graytune.errors import InvalidInputError
from graytune.serve.ledger import QuotaExceeded

__all__ = ["BLACK_BOX_EDITS", "DUPLICATE_ROWS", "ApiKeys", "QuotaExceeded", "ServeConfig", "warn_if_readable"]
log = logging.getLogger(__name__)

#: the values of ``ServeConfig.duplicate_rows`` (``--duplicate-rows``)
DUPLICATE_ROWS = ("allow", "count", "refuse")
#: the values of ``ServeConfig.black_box_edits`` (``--black-box-edits``)
BLACK_BOX_EDITS = ("allow", "count", "refuse")


@dataclass
class ServeConfig:
    """How the owner lends the backbone (``graytune serve`` flags). Limits answer 413, busy 503, quotas 429."""

    access: str = "dark-gray"
    """Highest level clients get: black-box, dark-gray or light-gray (white-box never crosses a network)."""
    reads: tuple[str, ...] = ()
    """Input or entry ports whose values clients may read (e.g. text.token_embeds for AdaLink)."""
    grant_topk: int = 0
    """For a language model: the most next tokens a client may read per position with their log-probabilities
    (top_k= on a forward), at most 20; each position then reveals that many values of the next-token
    distribution (0: none; full-vocabulary logits never cross)."""
    device: str = "auto"
    """Where the backbone runs: cpu, cuda or cuda:N (auto: CUDA when present, else CPU)."""
    dtype: str = "fp32"
    """The backbone's precision: fp32, bf16 or fp16 (half precision casts the frozen weights; clients send and
    receive float32)."""
    recompute: bool = False
    """Keep only layer inputs between a forward and its VJP and recompute the layers inside the VJP: exact, less
    session memory, about one more forward of time."""
    host: str = "127.0.0.1"
    """Interface to bind; the default keeps the service on this machine."""
    port: int = 8470
    """TCP port."""
    max_body_mb: float = 64.0
    """Largest request body accepted, in MiB (413 above)."""
    inflight_body_mb: float = 512.0
    """Request memory held at once by requests being read or waiting, in MiB (a body counts twice: bytes and
    tensors); past it new requests get 503 with Retry-After."""
    max_texts: int = 4096
    """Most strings in one request (tokenize, texts of a forward, hosted classes)."""
    max_text_chars: int = 4096
    """Most characters in one string (413 above, before tokenizing)."""
    max_request_chars: int = 262144
    """Most characters in all strings of one request, hosted classify prompts included (413 above)."""
    max_tokens: int = 16384
    """Most token positions in one request without gradients, rows x tokens per row with inserted tokens
    (413 above; MiniLM peaks at about 27 KB per position)."""
    max_grad_tokens: int = 8192
    """Most token positions in one request that wants gradients (413 above; MiniLM peaks at about 135 KB per
    position)."""
    max_pixels: int = 6422528
    """Most pixels in one request without gradients, rows x height x width (413 above; 128 images of 224 x 224;
    EfficientNet-Lite0 peaks at about 0.33 KB per pixel)."""
    max_grad_pixels: int = 1605632
    """Most pixels in one request that wants gradients (413 above; 32 images of 224 x 224; EfficientNet-Lite0
    peaks at about 1.7 KB per pixel)."""
    max_new_tokens: int = 256
    """Most tokens one generation request may ask per row (413 above); its positions, rows x (prompt + inserted
    + new tokens), count against --max-tokens too."""
    max_denoising_work: int = 2097152
    """Most UNet latent positions one image request may run (413 above): images x steps x latent height x latent
    width, twice that with guidance (the negative prompts' calls): 4 images of 512 x 512 at 64 guided steps on
    SD 1.x (latents 64 x 64); its images' pixels count against --max-pixels too. A forward's noisy latents (one
    UNet step per row) count as rows x latent height x latent width against it too."""
    request_timeout_s: float = 60.0
    """Deadline of one request: waiting for the backbone past it answers 503, computing past it stops the work
    at its next safe point and answers 504."""
    max_queue: int = 8
    """Most requests waiting for the backbone; more get 503 with Retry-After at once."""
    coalesce_ms: float = 0.0
    """Join forwards (and their VJPs) from different clients that arrive within this many milliseconds while the
    backbone is busy into one backbone call, their answers split back by rows; an idle backbone takes a forward at
    once (0: off; 10 is the setting measured in docs/benchmarks.md for many clients with small batches)."""
    coalesce_max_rows: int = 64
    """Most rows in one joined call; a request with more runs alone."""
    header_timeout_s: float = 10.0
    """Longest a connection may take to send a request's headers before it is closed."""
    body_timeout_s: float = 60.0
    """Longest a client may take to send a request body (408 after)."""
    keep_alive_s: float = 5.0
    """How long an idle keep-alive connection stays open."""
    connections_per_address: int = 64
    """Most connections from one address that are idle or still sending headers; past it the oldest closes."""
    max_connections: int = 2048
    """Most open connections and requests in all (503 above)."""
    session_ttl_s: float = 120.0
    """How long a forward's state waits for its VJP (swept on a timer)."""
    session_budget_mb: float = 2048.0
    """Total memory for pending sessions, in MiB; past it the client holding the most loses its oldest first."""
    client_sessions: int = 64
    """Most pending sessions per client."""
    client_session_mb: float = 512.0
    """Most session memory per client, in MiB (a quarter of --session-budget-mb: four clients fit in full)."""
    quota_samples: int = 0
    """Rows each client may send through the backbone, over the ledger's life (0: no limit)."""
    quota_grad_rows: int = 200000
    """Rows each client may get gradients for, over the ledger's life (0: no limit); gradients are the strongest
    extraction channel, so the default is finite: raise it per deployment."""
    quota_tokens: int = 0
    """Tokens each client may send and have generated, over the ledger's life (0: no limit): the real tokens of
    the texts it sends (attention-mask sums; padding and inserted vectors are not tokens) and every token a
    language model generates for it (a generation reserves rows x max_new_tokens and gives back what it did not
    generate)."""
    quota_db: str = ""
    """SQLite file of the quota ledger, shared by workers and restarts (default: KEYS_FILE.quota.sqlite3 beside
    the API key file)."""
    duplicate_rows: str = "count"
    """What to do with a request that wants gradients and repeats one of its rows exactly (the same inputs and
    per-row edits): one such call over E copies of an input, with E one-hot output gradients, returns that input's
    whole E-row Jacobian. allow: serve it; count: serve it and count it on /v1/stats (duplicate_row_batches,
    duplicate_rows) and in the log; refuse: answer 403 naming the repeated rows. Rows are compared as the
    backbone sees them (token ids and edits under attention mask 0 are ignored); rows that differ by any value it
    sees are distinct: the gradient-row quota is what bounds near-duplicates."""
    black_box_edits: str = "count"
    """What to do, where the server lends black-box, with a request that adds or inserts at an input port
    (text.token_embeds) with no gradient asked, what zeroth-order methods (dga-zo, prompt-zo) send: one forward over
    copies of one text, each under a +-eps edit on one dimension, returns Jacobian columns there by finite
    differences. allow: serve it; count: serve it and record it on /v1/stats (black_box_edit_calls and _rows, and
    same_input_edit_batches and _rows for batches whose rows are one input under different edits, whatever the
    edits' size) and in the log; refuse: answer 403 to any such edit (the zeroth-order methods cannot train). From
    dark-gray up a client may ask the exact VJP, so edits without gradients are served there as they come."""
    admins: tuple[str, ...] = ()
    """Client names (from the key file) that see every client's figures on /v1/stats."""
    adapters: tuple[str, ...] = ()
    """Trained adapters to host, as NAME=FOLDER (answered at /v1/adapters/NAME/...)."""
    batch_window_ms: float = 5.0
    """How long the adapter batcher waits to fill a batch."""
    max_batch: int = 256
    """Most samples in one batched backbone call for hosted adapters."""
    workers: int = 1
    """uvicorn worker processes (each keeps its own sessions, all share the quota ledger)."""
    jobs: str = ""
    """A folder for fine-tuning jobs (OpenAI's files, fine_tuning.jobs, models, embeddings and completions routes):
    uploaded files,
    each job's run and its model; kept across restarts, and jobs that were running resume (empty: no job routes).
    Needs graytune serve's own entry point (it adds the routes), one worker."""
    job_workers: int = 1
    """Jobs trained at once, each in a training process of its own that trains through this server as the client
    that created the job (more wait in a queue, first come first served)."""
    job_queue: int = 32
    """Most jobs waiting to run, all clients together (429 past it)."""
    client_jobs: int = 8
    """Most jobs one client may have queued, running or paused (429 past it)."""
    max_file_mb: float = 64.0
    """Largest uploaded file, in MiB (413 above); a tar or zip is also bounded unpacked (4 times this)."""
    client_files_mb: float = 512.0
    """Most bytes of uploaded files one client may keep, in MiB (429 past it; deleting files frees them)."""
    client_files: int = 64
    """Most uploaded files one client may keep (429 past it)."""
    malloc_arenas: int = 2
    """glibc malloc arenas for the server process (MALLOC_ARENA_MAX; 0: glibc's default of 8 per core, which
    kept 7.5 GB after eight concurrent worst-case requests where 2 keep 0.55 GB; docs/reliability.md)."""
    malloc_mmap_kb: int = 1024
    """Blocks of this many KiB and more are mapped on their own and returned to the system when freed
    (glibc's M_MMAP_THRESHOLD; 0: glibc's own threshold, which rises to 32 MiB and then keeps freed tensors)."""


_WARNED: set[Path] = set()  # key files already warned about in this process


def warn_if_readable(file: Path) -> None:
    """Log a warning when a key file's mode lets its group or others read or write it (POSIX only)."""
    mode = stat.S_IMODE(file.stat().st_mode)
    if os.name != "posix" or not mode & 0o077 or file.resolve() in _WARNED:
        return
    _WARNED.add(file.resolve())
    log.warning("API key file %s has mode %04o: other users of this machine can read or change the keys; "
                "run chmod 600 %s", file, mode, file)


class ApiKeys:
    """Client names by API key; keys are compared in constant time."""

    def __init__(self, keys: dict[str, str], source: Path | None = None) -> None:
        self.source = source  # the key file, when read from one
        if not keys:
            raise InvalidInputError("no API keys given; write lines of 'client-name secret-key' to the keys file")
        short = [name for name, key in keys.items() if len(key) < 16]
        if short:
            raise InvalidInputError(f"API keys of {', '.join(short)} are shorter than 16 characters; "
                                    "use e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        self._keys = [(name, key.encode()) for name, key in keys.items()]
        self.names = frozenset(keys)

    @classmethod
    def load(cls, path: str | os.PathLike[str], check_mode: bool = True) -> ApiKeys:
        """Read ``client-name secret-key`` lines (``#`` starts a comment); with ``check_mode``, warn (once per file
        and process) when the file is readable by its group or others."""
        file = Path(path)
        if not file.is_file():
            raise InvalidInputError(f"API key file {file} does not exist; write lines of 'client-name secret-key'")
        if check_mode:
            warn_if_readable(file)
        keys: dict[str, str] = {}
        for number, line in enumerate(file.read_text().splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) != 2 or words[0] in keys:
                raise InvalidInputError(f"{file}:{number}: expected 'client-name secret-key' with a new name, "
                                        f"got {len(words)} fields")
            keys[words[0]] = words[1]
        return cls(keys, file.resolve())

    def grant(self, name: str, key: str) -> None:
        """Let ``key`` (made by the server, never written to disk) act as the client ``name`` until ``revoke``:
        a fine-tuning job's training process trains through the server as the client that created it."""
        if name not in self.names or len(key) < 16:
            raise InvalidInputError(f"a server-made key must name a client of the key file ({name!r} is not one) "
                                    "and be at least 16 characters")
        self._keys = [*self._keys, (name, key.encode())]  # a new list: readers on other threads see old or new

    def revoke(self, key: str) -> None:
        """Forget a key ``grant`` gave (the key file's own keys stay)."""
        self._keys = [(n, k) for n, k in self._keys if k != key.encode()]

    def client(self, authorization: str | None) -> str | None:
        """The client named by an ``Authorization: Bearer KEY`` header, or ``None``."""
        scheme, _, given = (authorization or "").partition(" ")
        token = given.strip().encode() if scheme.lower() == "bearer" else b""
        found = None
        for name, key in self._keys:  # every key is compared, so timing says nothing about which matched
            if hmac.compare_digest(token, key) and token:
                found = name
        return found
