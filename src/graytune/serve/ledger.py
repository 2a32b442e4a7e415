"""The quota ledger: what each client has used, in one SQLite file shared by workers and restarts.

Every charge is one ``BEGIN IMMEDIATE`` transaction (SQLite's write lock, held for a
read and an update), so uvicorn workers, Ray Serve replicas on one machine and a
restarted server all see one exact count. The file is in WAL mode: readers never wait
for a writer. A request reserves what it will use after its checks pass and before it
runs; if it then fails (a deadline, a server error) ``refund`` gives the reservation back,
so only served work is charged.

Three budgets per client: ``samples`` (rows sent through the backbone, forward), ``grad_rows`` (rows whose
gradient is returned: a VJP of a batch of 32 uses 32) and ``tokens`` (the real tokens of the texts sent,
attention-mask sums, and every token a language model generates). A forward that wants
gradients leaves a *receipt* (a digest of what it sent, ``charge(receipt=...)``): if its session is
lost, the recompute that resends it pays its gradient rows only, and uses the receipt up; a recompute
with no receipt pays its samples too (``charge_recompute``), so recomputes sent without forwards skip
no quota. The newest ``RECEIPTS_PER_CLIENT`` receipts per client are kept. Beside the budgets, records
that are no budget: the gradient requests each client sent with repeated rows (``note_duplicates``,
``--duplicate-rows count``), and the black-box requests that edited an input port with no gradient asked,
with those whose rows are one input under different edits (``note_edits``, ``--black-box-edits count``).

Example:
    >>> ledger = QuotaLedger("quota.sqlite3", samples=0, grad_rows=200_000)
    >>> ledger.charge("alice", samples=32)          # QuotaExceeded (429) past a budget
    >>> ledger.used("alice")
    {'samples': 32, 'grad_rows': 0, 'tokens': 0}
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from graytune.errors import GraytuneError

_SCHEMA = """CREATE TABLE IF NOT EXISTS usage (
    client TEXT PRIMARY KEY,
    samples INTEGER NOT NULL DEFAULT 0,
    grad_rows INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0
)"""
_DUPLICATES = """CREATE TABLE IF NOT EXISTS duplicates (
    client TEXT PRIMARY KEY,
    batches INTEGER NOT NULL DEFAULT 0,
    rows INTEGER NOT NULL DEFAULT 0
)"""
_EDITS = """CREATE TABLE IF NOT EXISTS edits (
    client TEXT PRIMARY KEY,
    calls INTEGER NOT NULL DEFAULT 0,
    rows INTEGER NOT NULL DEFAULT 0,
    batches INTEGER NOT NULL DEFAULT 0,
    same_rows INTEGER NOT NULL DEFAULT 0
)"""
_RECEIPTS = """CREATE TABLE IF NOT EXISTS receipts (
    client TEXT NOT NULL,
    digest TEXT NOT NULL,
    rows INTEGER NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (client, digest)
)"""
#: receipts kept per client (the newest): forwards whose recompute may come later without paying again
RECEIPTS_PER_CLIENT = 1024
#: the budgets, in the order of the ``usage`` table's columns
BUDGETS = ("samples", "grad_rows", "tokens")
_FLAGS = {"samples": "--quota-samples", "grad_rows": "--quota-grad-rows", "tokens": "--quota-tokens"}
_WHAT = {"samples": "sample", "grad_rows": "gradient-row", "tokens": "token"}
_EDIT_KEYS = ("calls", "rows", "batches", "same_rows")


@dataclass
class Charge:
    """What one request was charged, so that a refund gives back exactly that (``QuotaLedger.refund``)."""

    samples: int = 0
    grad_rows: int = 0
    tokens: int = 0
    receipt: str | None = None  # the receipt a forward left, or the one a recompute used up
    restore: int = 0  # the rows of the receipt a recompute used up (its refund keeps the receipt again)


class QuotaExceeded(GraytuneError):
    """A client went past its sample, gradient-row or token budget (answered with 429)."""


class QuotaLedger:
    """Per-client usage in a SQLite database (WAL mode); exact across threads and processes.

    Args:
        path: the database file (created with its folder); shared by every process serving the same clients.
        samples: rows each client may send through the backbone; 0 for no limit.
        grad_rows: rows each client may get gradients for; 0 for no limit.
        tokens: tokens each client may send and have generated; 0 for no limit.
        timeout_s: how long a charge waits for another process's write lock.
    """

    def __init__(self, path: str | Path, samples: int = 0, grad_rows: int = 0, timeout_s: float = 30.0,
                 tokens: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.limits = {"samples": samples, "grad_rows": grad_rows, "tokens": tokens}
        self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()  # one connection per ledger, used by one thread at a time
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(usage)")}
            if "tokens" not in columns:  # a ledger written before tokens were counted
                self._db.execute("ALTER TABLE usage ADD COLUMN tokens INTEGER NOT NULL DEFAULT 0")
            self._db.execute(_DUPLICATES)
            self._db.execute(_EDITS)
            self._db.execute(_RECEIPTS)
        # reads go through their own connection: in WAL mode they never wait for a writer
        self._reader = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        self._read_lock = threading.Lock()

    def charge(self, client: str, samples: int = 0, grad_rows: int = 0, receipt: str | None = None,
               tokens: int = 0) -> None:
        """Add to ``client``'s usage, or raise ``QuotaExceeded`` (and add nothing) past a budget.

        ``receipt`` (a digest of a forward that wants gradients) is kept with the samples it paid, so that
        its recompute, if the session is lost, does not pay them again (``charge_recompute``).
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._add(client, samples, grad_rows, tokens)
                if receipt is not None:
                    self._keep_receipt(client, receipt, samples)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def charge_recompute(self, client: str, receipt: str, rows: int, grad_rows: int, tokens: int = 0) -> int:
        """Charge a recompute (a VJP that carries its forward again): its gradient rows, and its ``rows`` samples
        and ``tokens`` unless ``client`` paid for that very forward (``receipt``, used up here). Returns the
        samples charged (its tokens were charged with them when they were).

        A recompute sent without its forward pays like a forward: sending only recomputes skips no quota.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                paid = self._db.execute("SELECT rows FROM receipts WHERE client = ? AND digest = ?",
                                        (client, receipt)).fetchone()
                samples = 0 if paid is not None and paid[0] == rows else rows
                self._add(client, samples, grad_rows, tokens if samples else 0)
                if samples == 0:
                    self._db.execute("DELETE FROM receipts WHERE client = ? AND digest = ?", (client, receipt))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return samples

    def refund(self, client: str, samples: int = 0, grad_rows: int = 0, receipt: str | None = None,
               restore: int = 0, tokens: int = 0) -> None:
        """Give back a reservation whose work was not served: a forward's ``receipt`` goes with it, and a
        recompute that used one up gets it back (``restore``: the rows it paid for)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE usage SET samples = max(0, samples - ?), grad_rows = max(0, grad_rows - ?), "
                             "tokens = max(0, tokens - ?) WHERE client = ?", (samples, grad_rows, tokens, client))
            if receipt is not None and restore:
                self._keep_receipt(client, receipt, restore)
            elif receipt is not None:
                self._db.execute("DELETE FROM receipts WHERE client = ? AND digest = ?", (client, receipt))
            self._db.execute("COMMIT")

    def receipts(self, client: str) -> int:
        """How many paid forwards of ``client`` a recompute could still use."""
        with self._read_lock:
            return int(self._reader.execute("SELECT count(*) FROM receipts WHERE client = ?", (client,)).fetchone()[0])

    def used(self, client: str) -> dict[str, int]:
        """``{"samples", "grad_rows", "tokens"}`` charged to ``client`` so far (never waits for a writer)."""
        with self._read_lock:
            return self._used(client, self._reader)

    def all_used(self) -> dict[str, dict[str, int]]:
        """Usage of every client in the ledger."""
        with self._read_lock:
            rows = self._reader.execute("SELECT client, samples, grad_rows, tokens FROM usage ORDER BY client")
            return {client: dict(zip(BUDGETS, used)) for client, *used in rows.fetchall()}

    def note_duplicates(self, client: str, rows: int) -> None:
        """Record one gradient request of ``client`` in which ``rows`` rows repeated an earlier row."""
        with self._lock:
            self._db.execute("INSERT INTO duplicates (client, batches, rows) VALUES (?, 1, ?) ON CONFLICT(client) "
                             "DO UPDATE SET batches = batches + 1, rows = rows + excluded.rows", (client, rows))

    def duplicates(self, client: str) -> dict[str, int]:
        """``{"batches", "rows"}``: gradient requests of ``client`` with repeated rows, and those rows."""
        with self._read_lock:
            row = self._reader.execute("SELECT batches, rows FROM duplicates WHERE client = ?", (client,)).fetchone()
        return {"batches": row[0], "rows": row[1]} if row else {"batches": 0, "rows": 0}

    def all_duplicates(self) -> dict[str, dict[str, int]]:
        """``duplicates`` of every client that sent any."""
        with self._read_lock:
            rows = self._reader.execute("SELECT client, batches, rows FROM duplicates ORDER BY client").fetchall()
        return {client: {"batches": b, "rows": r} for client, b, r in rows}

    def note_edits(self, client: str, rows: int, same_rows: int) -> None:
        """Record one black-box request of ``client`` that edited an input port, of ``rows`` rows, of which
        ``same_rows`` repeat an earlier row's input under another edit (a batch when any do)."""
        with self._lock:
            self._db.execute("INSERT INTO edits (client, calls, rows, batches, same_rows) VALUES (?, 1, ?, ?, ?) "
                             "ON CONFLICT(client) DO UPDATE SET calls = calls + 1, rows = rows + excluded.rows, "
                             "batches = batches + excluded.batches, same_rows = same_rows + excluded.same_rows",
                             (client, rows, int(same_rows > 0), same_rows))

    def edits(self, client: str) -> dict[str, int]:
        """``{"calls", "rows", "batches", "same_rows"}``: ``client``'s black-box requests with edits at input
        ports and their rows, and those whose rows were one input under different edits, and those rows."""
        with self._read_lock:
            row = self._reader.execute("SELECT calls, rows, batches, same_rows FROM edits WHERE client = ?",
                                       (client,)).fetchone()
        return dict(zip(_EDIT_KEYS, row or (0, 0, 0, 0)))

    def all_edits(self) -> dict[str, dict[str, int]]:
        """``edits`` of every client that sent any."""
        with self._read_lock:
            rows = self._reader.execute("SELECT client, calls, rows, batches, same_rows FROM edits ORDER BY client")
            return {client: dict(zip(_EDIT_KEYS, counts)) for client, *counts in rows.fetchall()}

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._db.close()
            self._reader.close()

    def _add(self, client: str, samples: int, grad_rows: int, tokens: int = 0) -> None:
        """Inside a transaction: add to ``client``'s usage, or ``QuotaExceeded`` past a budget."""
        used = self._used(client)
        for name, amount in zip(BUDGETS, (samples, grad_rows, tokens)):
            limit = self.limits[name]
            if amount and limit and used[name] + amount > limit:
                raise QuotaExceeded(
                    f"{_WHAT[name]} quota of {limit} reached for client {client!r} ({used[name]} used, "
                    f"{amount} asked); send smaller batches or ask the owner to raise {_FLAGS[name]}")
        self._db.execute("INSERT INTO usage (client, samples, grad_rows, tokens) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT(client) DO UPDATE SET samples = samples + excluded.samples, "
                         "grad_rows = grad_rows + excluded.grad_rows, tokens = tokens + excluded.tokens",
                         (client, samples, grad_rows, tokens))

    def _keep_receipt(self, client: str, receipt: str, rows: int) -> None:
        """Inside a transaction: keep ``receipt``, and only the newest ``RECEIPTS_PER_CLIENT`` of ``client``'s."""
        newest = self._db.execute("SELECT coalesce(max(at), 0) FROM receipts WHERE client = ?", (client,)).fetchone()[0]
        self._db.execute("INSERT OR REPLACE INTO receipts (client, digest, rows, at) VALUES (?, ?, ?, ?)",
                         (client, receipt, rows, newest + 1))  # a counter per client orders them, across processes
        self._db.execute("DELETE FROM receipts WHERE client = ? AND at <= (SELECT at FROM receipts WHERE client = ? "
                         "ORDER BY at DESC LIMIT 1 OFFSET ?)", (client, client, RECEIPTS_PER_CLIENT))

    def _used(self, client: str, db: sqlite3.Connection | None = None) -> dict[str, int]:
        row = (db or self._db).execute("SELECT samples, grad_rows, tokens FROM usage WHERE client = ?",
                                       (client,)).fetchone()
        return dict(zip(BUDGETS, row or (0, 0, 0)))
