"""Edits at input ports from black-box clients, refused, counted or allowed as the owner says (``--black-box-edits``).

At black-box a client may ``add`` or ``insert`` at an input port (``text.token_embeds``) with no gradient
asked: the zeroth-order methods (``dga-zo``, ``prompt-zo``) need it. Such edits make the discrete text a
continuous input, so one forward over copies of one text, each under ``±ε`` on one embedding dimension,
returns Jacobian columns at the token embeddings by finite differences, no gradient asked (DESIGN §1).
Pixels are continuous raw inputs already: for images the same differences need no edit, and any black-box
API serves them; there is nothing to refuse there.

Where the server lends black-box:

- ``refuse``: any such edit answers 403 ``black_box_edits`` naming the flag, before anything is charged or run;
- ``count``: served, and recorded per client once charged: every such request (calls, rows), and a batch
  whose rows are one input under different edits (``same_input_rows``: the finite-difference pattern, whatever
  the edits' size) as well (batches, rows); on ``/v1/stats`` and in the log;
- ``allow``: served, not recorded.

From dark-gray up a client may ask the exact VJP, so edits without gradients reveal nothing more there and
are served as they come.

Example:
    >>> ports = refuse_edits("refuse", handle, plan)      # 403 for a black-box plan that edits text.token_embeds
    >>> same_input_rows(plan, handle.spec)                # 63 for 64 copies of one text under ±eps edits
"""

from __future__ import annotations

import logging

from graytune.access import CallPlan, LocalHandle
from graytune.methods import METHODS
from graytune.serve.admission import HTTPProblem, repeated_rows, seen_rows
from graytune.serve.ledger import QuotaLedger
from graytune.serve.refusals import methods_at
from graytune.types import AccessLevel, BackboneSpec, PortKind

__all__ = ["edited_inputs", "edits_refused", "note_edits", "refuse_edits", "same_input_rows"]
log = logging.getLogger(__name__)


def edited_inputs(spec: BackboneSpec, plan: CallPlan) -> list[str]:
    """The input ports ``plan`` adds or inserts at (e.g. ``["text.token_embeds"]``)."""
    kinds = {port.name: port.kind for port in spec.ports}
    return sorted({name for group in (plan.add, plan.insert) for name in group if kinds.get(name) is PortKind.INPUT})


def same_input_rows(plan: CallPlan, spec: BackboneSpec) -> int:
    """Rows of ``plan`` that repeat an earlier row's input under another edit: the rows a finite-difference
    batch adds (copies of one text, each with its own ``±ε``). Inputs are compared as the backbone sees them
    (``admission.seen_rows``: nothing under attention mask 0 counts); rows that repeat an earlier row exactly,
    edits included, reveal nothing more and are not counted; edits shared by every row make no row differ."""
    rows = _rows(plan)
    if rows < 2:
        return 0
    ranks = {port.name: len(port.shape) for port in spec.ports}
    same_input = repeated_rows(rows, seen_rows(rows, plan.inputs, {}, {}, ranks))
    if not same_input:
        return 0
    exact = repeated_rows(rows, seen_rows(rows, plan.inputs, plan.add, plan.insert, ranks))
    return len(set(same_input) - set(exact))


def refuse_edits(policy: str, handle: LocalHandle, plan: CallPlan) -> list[str]:
    """The input ports a black-box ``plan`` edits where ``policy`` asks to look at them (empty otherwise); a 403
    (``edits_refused``) when it refuses them. ``policy`` is ``Service.edits_policy``: ``--black-box-edits`` where
    the server lends black-box, ``allow`` above."""
    if handle.access is not AccessLevel.BLACK_BOX or policy == "allow":
        return []
    ports = edited_inputs(handle.spec, plan)
    if ports and policy == "refuse":
        raise edits_refused(handle, ports)
    return ports


def note_edits(ledger: QuotaLedger, client: str, handle: LocalHandle, plan: CallPlan, policy: str) -> None:
    """Record a served black-box request that edits an input port, where ``policy`` is ``count``."""
    if policy != "count" or not refuse_edits(policy, handle, plan):
        return
    rows, same = _rows(plan), same_input_rows(plan, handle.spec)
    ledger.note_edits(client, rows, same)
    if same:
        log.warning("client %s sent a black-box request in which %d of %d rows repeat an earlier row's input under "
                    "another edit (finite differences; counted: --black-box-edits count)", client, same, rows)


def edits_refused(handle: LocalHandle, ports: list[str]) -> HTTPProblem:
    """The 403 for edits at input ports from a black-box client where the owner refuses them."""
    working = [name for name in methods_at(handle) if not METHODS[name].zeroth_order]
    return HTTPProblem(
        403, "black_box_edits",
        f"add/insert at {', '.join(ports)} from a black-box client: this server refuses edits at input ports "
        "without gradients (graytune serve --black-box-edits refuse), since a batch of one text under +-eps edits "
        "returns the backbone's Jacobian by finite differences; the zeroth-order methods (dga-zo, prompt-zo) send "
        f"such edits and cannot train here; methods that send none: {', '.join(working) or 'none'}; or ask the "
        "owner to run graytune serve --black-box-edits count (or allow), or to lend dark-gray")


def _rows(plan: CallPlan) -> int:
    return plan.batch or int(next(iter(plan.inputs.values())).shape[0])
