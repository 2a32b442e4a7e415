"""Coalescing (``--coalesce-ms``, issue 30 item 1): forwards and VJPs of different clients share backbone calls,
and every client gets what it would have got alone; a client that never sends its VJP holds nobody up; quotas
stay exact per client."""

from __future__ import annotations

import threading
import time

import torch

import graytune
from tests.serve.conftest import ALICE, BOB

#: texts of different lengths per client: the joined call pads them to the longest
TEXTS = [["a small cat sleeps on the mat"], ["rain", "two dogs run after a red ball in the park"],
         ["the old roof", "sun", "a boat on a quiet lake at dusk"], ["one more text of a few words"]]


def _edits(seed: int, rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"shift": (0.05 * torch.randn(1, 1, 384, generator=g)).requires_grad_(),
            "tokens": (0.05 * torch.randn(1, 2, 384, generator=g)).requires_grad_(),
            "inner": (0.05 * torch.randn(rows, 1, 384, generator=g)).requires_grad_()}


def _step(handle, texts, seed):  # type: ignore[no-untyped-def]
    edits = _edits(seed, len(texts))
    out = handle.forward({"text": texts}, add={"text.token_embeds": edits["shift"], "text.layer.4": edits["inner"]},
                         insert={"text.token_embeds": edits["tokens"]})
    ((out["text.embeds"] ** 2).sum() + out["text.embeds"][:, :7].sum()).backward()
    return out["text.embeds"].detach(), {k: v.grad for k, v in edits.items()}


def _together(handles, jobs):  # type: ignore[no-untyped-def]
    """Run ``jobs[i](handles[i])`` on threads released at once; their results in order."""
    start, results = threading.Barrier(len(jobs)), [None] * len(jobs)

    def run(i: int) -> None:
        start.wait()
        results[i] = jobs[i](handles[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_coalesced_answers_equal_each_clients_solo_answers(serve, minilm) -> None:  # type: ignore[no-untyped-def]
    url, app = serve(coalesce_ms=200.0)
    joiner = app.state.service.joiner
    joiner.eager = False  # every forward waits its window, so these four surely meet
    keys = [ALICE, BOB, ALICE, BOB]
    remotes = [graytune.open_backbone(url, "light-gray", api_key=k) for k in keys]
    for _ in range(2):  # twice: the second round's requests find each other too
        got = _together(remotes, [lambda h, i=i: _step(h, TEXTS[i], i) for i in range(4)])
        for i, (z, grads) in enumerate(got):
            z_solo, g_solo = _step(minilm, TEXTS[i], i)
            torch.testing.assert_close(z, z_solo, rtol=0, atol=1e-5)
            for name, g in g_solo.items():
                assert g.abs().sum() > 0
                # float32 sums in another order (joined rows, padded positions): 1e-5 of the gradient's norm
                assert float((grads[name] - g).norm() / g.norm()) <= 1e-5, name  # measured <= 2e-6
    assert joiner.joined >= 4 and joiner.calls < 8  # requests did share calls
    used = app.state.service.ledger.all_used()
    rows = {"alice": len(TEXTS[0]) + len(TEXTS[2]), "bob": len(TEXTS[1]) + len(TEXTS[3])}
    for client, n in rows.items():  # each client charged its own rows, forward and VJP, and nothing else
        assert used[client]["samples"] == 2 * n and used[client]["grad_rows"] == 2 * n


def test_a_client_that_never_sends_its_vjp_holds_nobody_up(serve, minilm) -> None:  # type: ignore[no-untyped-def]
    url, app = serve(coalesce_ms=200.0)
    app.state.service.joiner.eager = False
    remotes = [graytune.open_backbone(url, "light-gray", api_key=k) for k in (ALICE, BOB)]

    def walk_away(handle):  # type: ignore[no-untyped-def]
        edits = _edits(5, 1)
        return handle.forward({"text": TEXTS[0]}, add={"text.token_embeds": edits["shift"]})["text.embeds"]

    def train(handle):  # type: ignore[no-untyped-def]
        edits = _edits(6, 1)
        out = handle.forward({"text": TEXTS[3]}, add={"text.token_embeds": edits["shift"]})["text.embeds"]
        out.square().sum().backward()
        return out.detach(), edits["shift"].grad

    gone, (z, grad) = _together(remotes, [walk_away, train])
    assert gone.requires_grad  # it asked for gradients and never differentiated
    edits = _edits(6, 1)
    solo = minilm.forward({"text": TEXTS[3]}, add={"text.token_embeds": edits["shift"]})["text.embeds"]
    solo.square().sum().backward()
    assert float((grad - edits["shift"].grad).norm() / edits["shift"].grad.norm()) <= 1e-5
    assert app.state.service.joiner.joined == 2
    gone.sum().backward()  # late: its rows were answered with zeros and its session dropped; it recomputes alone
    assert remotes[0].exposure.gradient_queries == 1


def test_requests_over_the_row_limit_run_alone(serve) -> None:  # type: ignore[no-untyped-def]
    url, app = serve(coalesce_ms=100.0, coalesce_max_rows=4)
    app.state.service.joiner.eager = False
    remotes = [graytune.open_backbone(url, "light-gray", api_key=k) for k in (ALICE, BOB, BOB)]
    texts = [[f"text number {i}" for i in range(6)], ["short one"], ["short two"]]
    _together(remotes, [lambda h, i=i: h.forward({"text": texts[i]})["text.embeds"] for i in range(3)])
    joiner = app.state.service.joiner
    assert joiner.joined == 2 and joiner.calls == 1  # the two small ones joined; the six rows ran alone, unjoined


def test_a_lone_client_pays_no_window(serve) -> None:  # type: ignore[no-untyped-def]
    url, app = serve(coalesce_ms=2000.0)  # a window no test would sit through
    remote = graytune.open_backbone(url, "light-gray", api_key=ALICE)
    shift = torch.zeros(1, 1, 384, requires_grad=True)
    start = time.monotonic()
    remote.forward({"text": TEXTS[0]}, add={"text.token_embeds": shift})["text.embeds"].sum().backward()
    assert time.monotonic() - start < 2.0 and shift.grad is not None  # the idle backbone took it at once


def test_a_full_group_goes_in_arrival_order_and_never_passes_the_row_limit(serve, minilm) -> None:  # type: ignore[no-untyped-def]
    """Fairness: a heavy client's batches fill groups up to --coalesce-max-rows and no further; a light client's
    request joins the group it arrived in, and nothing it gets differs from its solo answer."""
    url, app = serve(coalesce_ms=300.0, coalesce_max_rows=8)
    joiner = app.state.service.joiner
    joiner.eager = False
    remotes = [graytune.open_backbone(url, "light-gray", api_key=k) for k in (ALICE, BOB, ALICE)]
    batches = [[f"heavy text {i}" for i in range(6)], ["a light one"], [f"heavy again {i}" for i in range(6)]]

    def send(i):  # type: ignore[no-untyped-def]
        def run(handle):  # type: ignore[no-untyped-def]
            time.sleep(0.03 * i)  # arrival order: heavy, light, heavy
            return handle.forward({"text": batches[i]})["text.embeds"]
        return run

    got = _together(remotes, [send(i) for i in range(3)])
    assert joiner.largest <= 8 and joiner.calls == 2  # {heavy, light} then {heavy}: never 13 rows in one call
    for texts, z in zip(batches, got):
        torch.testing.assert_close(z, minilm.forward({"text": texts})["text.embeds"], rtol=0, atol=1e-5)


def test_a_client_that_disconnects_while_its_forward_waits_fails_nobody(serve, minilm) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from graytune.access.wire import encode

    url, app = serve(coalesce_ms=400.0)
    app.state.service.joiner.eager = False
    ids = minilm.tokenize(["a text that waits for company"])
    body = encode({f"inputs/{k}": v for k, v in ids.items()})

    def leave(_):  # type: ignore[no-untyped-def]
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {BOB}"}, timeout=0.1) as client:
            try:
                client.post("/v1/forward", content=body)
            except httpx.TimeoutException:
                return "left"
        return "answered"

    def stay(handle):  # type: ignore[no-untyped-def]
        return handle.forward({"text": TEXTS[1]})["text.embeds"]

    remote = graytune.open_backbone(url, "light-gray", api_key=ALICE)
    left, z = _together([None, remote], [leave, stay])
    assert left == "left"  # it hung up inside the window, before the joined call ran
    torch.testing.assert_close(z, minilm.forward({"text": TEXTS[1]})["text.embeds"], rtol=0, atol=1e-5)
    assert remote.forward({"text": TEXTS[0]})["text.embeds"].shape == (1, 384)  # and the server serves on
