"""The owner-side call: no hidden global state, and a session's bytes never include the owner's weights."""

from __future__ import annotations

import sys

import torch

import graytune
from graytune.access.owner import graph_bytes


def _module_level_sizes() -> dict[str, int]:
    """The size of every module-level dict, list or set in graytune's modules (caches would grow here)."""
    sizes = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("graytune"):
            continue
        for attr, value in vars(module).items():
            if not attr.startswith("__") and isinstance(value, dict | list | set):
                sizes[f"{name}.{attr}"] = len(value)
    return sizes


def _measured_call(handle):  # type: ignore[no-untyped-def]
    shift = torch.zeros(1, 1, 384, requires_grad=True)
    plan = handle.plan({"text": ["a cat on a mat", "rain"]}, {"text.token_embeds": shift}, {}, ["text.embeds"], [])
    call = handle.open_call(plan, measure=True)
    call.forward([plan.tensor(g, p) for g, p in plan.slots])
    return call


def test_repeated_calls_grow_no_module_level_cache() -> None:
    handle = graytune.open_backbone("bridge:efficientnet-lite0+minilm", "dark-gray")  # module(): a new object per call
    first = _measured_call(handle)
    before = _module_level_sizes()
    calls = [_measured_call(handle) for _ in range(3)]
    assert _module_level_sizes() == before
    assert {c.nbytes for c in calls} == {first.nbytes}  # the same request holds the same bytes every time
    assert not any(name.endswith("._WEIGHTS") for name in before)


def test_session_bytes_exclude_the_owners_weights() -> None:
    handle = graytune.open_backbone("minilm", "dark-gray")
    call = _measured_call(handle)
    outs = call._graph[0]  # type: ignore[index]
    module = graytune.open_backbone("minilm", "white-box").module()  # a copy the size of the owner's weights
    weights = sum(t.untyped_storage().nbytes() for t in [*module.parameters(), *module.buffers()])
    with_weights = graph_bytes(outs)  # the same graph, nothing excluded: the linear layers saved their weights
    assert 0 < call.nbytes < with_weights
    assert with_weights - call.nbytes <= weights


def test_a_deadline_stops_the_forward_and_the_backward_at_their_next_step() -> None:
    import time

    import pytest

    from graytune.access.owner import DeadlineExceeded, deadline

    handle = graytune.open_backbone("minilm", "dark-gray")
    ids = torch.randint(1000, 20000, (32, 128), generator=torch.Generator().manual_seed(0))

    def call():  # type: ignore[no-untyped-def]
        shift = torch.zeros(1, 1, 384, requires_grad=True)
        plan = handle.plan({"text.input_ids": ids}, {"text.token_embeds": shift}, {}, ["text.embeds"], [])
        return plan, handle.open_call(plan)

    plan, free = call()
    (z,) = free.forward([plan.tensor(g, p) for g, p in plan.slots])
    (g,) = free.vjp([torch.ones_like(z)])
    plan, timed = call()
    with deadline(time.monotonic() + 60):  # a deadline not reached changes nothing, bit for bit
        (z2,) = timed.forward([plan.tensor(g, p) for g, p in plan.slots])
        (g2,) = timed.vjp([torch.ones_like(z2)])
    assert torch.equal(z, z2) and torch.equal(g, g2)
    for stage in ("forward", "backward"):
        plan, late = call()
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            if stage == "forward":
                with deadline(start + 0.05):
                    late.forward([plan.tensor(g, p) for g, p in plan.slots])
            else:
                (z3,) = late.forward([plan.tensor(g, p) for g, p in plan.slots])
                start = time.monotonic()
                with deadline(start + 0.05):
                    late.vjp([torch.ones_like(z3)])
        assert time.monotonic() - start < 0.5, stage  # the whole step takes ~1.5 s on 2 cores


def test_a_deadline_leaves_the_thread_in_the_autograd_mode_it_found() -> None:
    """A forward stopped inside ``torch.set_grad_enabled`` must not leave the thread with autograd off."""
    import time

    import pytest

    from graytune.access.owner import DeadlineExceeded, deadline

    handle = graytune.open_backbone("minilm", "dark-gray")
    ids = torch.randint(1000, 20000, (32, 128), generator=torch.Generator().manual_seed(0))
    plan = handle.plan({"text.input_ids": ids}, {}, {}, ["text.embeds"], [])  # no gradient: runs under no_grad
    for mode in (True, False):
        with torch.set_grad_enabled(mode):
            with pytest.raises(DeadlineExceeded), deadline(time.monotonic() + 0.01):
                handle.open_call(plan).forward([])
            assert torch.is_grad_enabled() is mode
