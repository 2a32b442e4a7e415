"""Counting an attack's boundary calls the way the black-box papers count them.

One batched forward is one call, whatever its batch; a vector–Jacobian product is one more
call (it is a second request to a server). Calls are read from the handle's own exposure
record, so they count what crossed the boundary, not what the attack meant to send. Samples
(rows sent forward) and gradient rows (rows whose VJP came back) are counted beside them:
they are what ``graytune serve --quota-samples`` and ``--quota-grad-rows`` bound. Edit rows are the rows
of black-box calls that sent an edit at an input port with no gradient asked (``add`` at
``text.token_embeds``, what finite differences need; ``Exposure.black_box_edits``), what ``graytune serve
--black-box-edits`` is about. Attacks add to ``grad_rows`` themselves (the rows they asked gradients for).
Tokenizing (``handle.tokenize``) is not counted: the tokenizer is public, and on a server it
is a separate endpoint that never runs the backbone.

Example:
    >>> meter = CallMeter(handle, budget=100)
    >>> if meter.afford(2):            # a forward and its VJP
    ...     ...
    >>> meter.calls, meter.samples, meter.grad_rows, meter.edit_rows
"""

from __future__ import annotations

from typing import Any


class CallMeter:
    """The calls, samples, gradient rows and edit rows one attack spent through ``handle`` since the meter was
    made."""

    def __init__(self, handle: Any, budget: int) -> None:
        self.handle, self.budget = handle, budget
        exposure = handle.exposure
        self._start = (exposure.forward_queries, exposure.gradient_queries, exposure.forward_samples,
                       _edit_rows(exposure))
        self.grad_rows = 0

    @property
    def forwards(self) -> int:
        return self.handle.exposure.forward_queries - self._start[0]

    @property
    def vjps(self) -> int:
        return self.handle.exposure.gradient_queries - self._start[1]

    @property
    def calls(self) -> int:
        """Forwards plus VJPs."""
        return self.forwards + self.vjps

    @property
    def samples(self) -> int:
        """Rows sent through forward."""
        return self.handle.exposure.forward_samples - self._start[2]

    @property
    def edit_rows(self) -> int:
        """Rows of black-box calls that edited an input port with no gradient asked."""
        return _edit_rows(self.handle.exposure) - self._start[3]

    def afford(self, calls: int) -> bool:
        """Whether ``calls`` more stay within the budget."""
        return self.calls + calls <= self.budget

    def spent(self) -> dict[str, int]:
        """``{"calls", "forwards", "vjps", "samples", "grad_rows", "edit_rows"}`` so far."""
        return {"calls": self.calls, "forwards": self.forwards, "vjps": self.vjps, "samples": self.samples,
                "grad_rows": self.grad_rows, "edit_rows": self.edit_rows}


def _edit_rows(exposure: Any) -> int:
    return int(getattr(exposure, "black_box_edits", {}).get("rows", 0))
