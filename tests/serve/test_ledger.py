"""The quota ledger: one exact count shared by threads, processes and restarts, charged only for served
work, gradients counted in rows."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading

import httpx
import pytest
import torch

import graytune
from graytune.access.wire import encode
from graytune.serve import ApiKeys, ServeConfig, create_app
from graytune.serve.ledger import QuotaExceeded, QuotaLedger
from graytune.serve.runner import BackgroundServer
from tests.serve.conftest import ALICE, BOB, KEYS

IDS = {"inputs/text.input_ids": torch.tensor([[101, 1037, 4937, 102]]),
       "inputs/text.attention_mask": torch.ones(1, 4, dtype=torch.long)}


def test_charges_refunds_and_refusals(tmp_path) -> None:
    ledger = QuotaLedger(tmp_path / "q.sqlite3", samples=10, grad_rows=4)
    ledger.charge("alice", samples=6, grad_rows=4)
    with pytest.raises(QuotaExceeded, match=r"sample quota of 10 reached for client 'alice' \(6 used, 5 asked\).*"
                                            "--quota-samples"):
        ledger.charge("alice", samples=5)
    with pytest.raises(QuotaExceeded, match="gradient-row quota of 4.*--quota-grad-rows"):
        ledger.charge("alice", grad_rows=1)
    assert ledger.used("alice") == {"samples": 6, "grad_rows": 4, "tokens": 0}  # a refused charge adds nothing
    ledger.refund("alice", samples=2)
    ledger.charge("bob", samples=10)
    assert ledger.all_used() == {"alice": {"samples": 4, "grad_rows": 4, "tokens": 0},
                                 "bob": {"samples": 10, "grad_rows": 0, "tokens": 0}}
    assert ServeConfig().quota_grad_rows > 0  # gradients are never unlimited by default


def test_tokens_are_a_budget_and_a_ledger_written_before_them_gains_them(tmp_path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)  # the schema before tokens were counted
    old.execute("CREATE TABLE usage (client TEXT PRIMARY KEY, samples INTEGER NOT NULL DEFAULT 0, "
                "grad_rows INTEGER NOT NULL DEFAULT 0)")
    old.execute("INSERT INTO usage VALUES ('alice', 5, 1)")
    old.commit()
    old.close()
    ledger = QuotaLedger(path, tokens=10)
    assert ledger.used("alice") == {"samples": 5, "grad_rows": 1, "tokens": 0}
    ledger.charge("alice", samples=1, tokens=8)
    with pytest.raises(QuotaExceeded, match=r"token quota of 10 reached for client 'alice' \(8 used, 3 asked\).*"
                                            "--quota-tokens"):
        ledger.charge("alice", samples=1, tokens=3)
    assert ledger.used("alice") == {"samples": 6, "grad_rows": 1, "tokens": 8}
    ledger.refund("alice", tokens=5)
    assert ledger.charge_recompute("alice", "never-paid", 1, 1, tokens=2) == 1  # no receipt: samples and tokens
    assert ledger.used("alice") == {"samples": 7, "grad_rows": 2, "tokens": 5}


_WORKER = """
import sys
from graytune.serve.ledger import QuotaLedger, QuotaExceeded
ledger, ok = QuotaLedger(sys.argv[1], grad_rows=25), 0
for _ in range(20):
    try:
        ledger.charge("alice", grad_rows=1)
        ok += 1
    except QuotaExceeded:
        pass
print(ok)
"""


def test_two_processes_and_threads_share_one_exact_count(tmp_path) -> None:
    path = tmp_path / "q.sqlite3"
    QuotaLedger(path, grad_rows=25)  # created once, as a server's first worker does
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    ledger, served = QuotaLedger(path, grad_rows=25), []

    def charge() -> None:
        for _ in range(10):
            try:
                ledger.charge("alice", grad_rows=1)
                served.append(1)
            except QuotaExceeded:
                pass

    threads = [threading.Thread(target=charge) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    counts = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert sum(counts) + len(served) == 25 == ledger.used("alice")["grad_rows"]


@pytest.fixture
def remote(tmp_path):  # type: ignore[no-untyped-def]
    """A server whose ledger lives beside its key file, and alice's raw HTTP client to it."""
    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"{name} {key}\n" for name, key in KEYS.items()))
    servers = []

    def start(**config):  # type: ignore[no-untyped-def]
        handle = graytune.open_backbone("minilm", "dark-gray")
        server = BackgroundServer(create_app(handle, ServeConfig(access="dark-gray", **config), ApiKeys.load(keys)))
        servers.append(server)
        return server.start()

    yield start, keys
    for server in servers:
        server.stop()


def test_only_served_work_is_charged(remote) -> None:
    start, _ = remote
    url = start(quota_samples=100, quota_grad_rows=100)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60) as alice:
        bad = [encode({**IDS, "add/text.token_embeds": torch.full((1, 1, 384), float("nan"))}),
               encode({"inputs/text.input_ids": torch.full((10_000, 16), 1037)}),
               encode({**IDS, "add/text.layer.3": torch.zeros(1, 1, 384)})]
        assert [alice.post("/v1/forward", content=b).status_code for b in bad] == [400, 413, 403]
        gone = alice.post("/v1/vjp", content=encode({"grad/text.embeds": torch.ones(1, 384)}, {"session": "x" * 43}))
        assert gone.status_code == 410
        assert alice.get("/v1/stats").json()["samples_used"] == 0 and alice.get("/v1/stats").json()[
            "grad_rows_used"] == 0
        shift = torch.zeros(1, 1, 384)
        forward = encode({**IDS, "add/text.token_embeds": shift}, {"grad": ["add/text.token_embeds"]})
        assert alice.post("/v1/forward", content=forward).status_code == 200
        recompute = encode({**IDS, "add/text.token_embeds": shift, "grad/text.embeds": torch.ones(1, 384)},
                           {"grad": ["add/text.token_embeds"], "recompute": True})
        assert alice.post("/v1/vjp", content=recompute).status_code == 200  # the lost session's recompute
        used = alice.get("/v1/stats").json()
    assert (used["samples_used"], used["grad_rows_used"]) == (1, 1)  # the forward once, its gradient once


def test_the_gradient_quota_counts_rows_not_calls(remote) -> None:
    start, _ = remote
    url = start(quota_grad_rows=383)
    handle = graytune.open_backbone(url, "dark-gray", api_key=ALICE)
    shift = torch.zeros(1, 1, 384, requires_grad=True)
    with pytest.raises(graytune.errors.RemoteError, match="gradient-row quota of 383") as err:
        handle.forward({"text": ["the same row"] * 384}, add={"text.token_embeds": shift})["text.embeds"].sum(
            ).backward()  # one call of 384 identical rows would give a 384 x 384 Jacobian
    assert err.value.status == 429 and handle.stats()["sessions"] == 0  # the client released its session
    handle.forward({"text": ["the same row"] * 383}, add={"text.token_embeds": shift})["text.embeds"].sum().backward()
    assert handle.stats()["grad_rows_used"] == 383


def test_usage_survives_a_restart(remote) -> None:
    start, keys = remote
    url = start(quota_samples=3)
    graytune.open_backbone(url, "dark-gray", api_key=ALICE).encode_text(["a", "b"])
    url = start(quota_samples=3)  # a second server on the same key file: the same ledger
    again = graytune.open_backbone(url, "dark-gray", api_key=ALICE)
    with pytest.raises(graytune.errors.RemoteError, match=r"sample quota of 3 .*\(2 used, 2 asked\)"):
        again.encode_text(["c", "d"])
    assert graytune.open_backbone(url, "dark-gray", api_key=BOB).encode_text(["c", "d"]).shape == (2, 384)
    assert (keys.parent / "keys.txt.quota.sqlite3").is_file()

