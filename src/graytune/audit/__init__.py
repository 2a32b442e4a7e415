"""The exposure audit: what a client at each access level could extract, measured in boundary calls.

``run_audit`` attacks a backbone (in process or behind ``graytune serve``) as a client at each level
would, within a budget of calls, and reports the fidelity reached against the calls spent:

- functional extraction: a small surrogate distilled from outputs alone and from finite-difference
  slopes along edits at the token embeddings with no gradient asked (black-box), and from per-token
  VJPs with several cotangents per item (dark-gray and up), scored by held-out cosine and by its
  linear-probe accuracy on a real task as a fraction of the backbone's;
- the finite-difference Jacobian (black-box): a whole Jacobian at the token embeddings of a text from
  forwards alone, scored against the dark-gray VJP;
- the token-embedding table: its relative geometry recovered by gradient descent through VJPs
  (dark-gray and up), and its exact rows under a ``read`` grant;
- the duplicate-row batch: a whole Jacobian from one forward and one VJP.

Each level gets a recommendation in graytune serve's units (``--quota-samples``, ``--quota-grad-rows``,
``--black-box-edits``): 10x below the point at which a surrogate reaches 90 % of the backbone's probe
accuracy, the lowest among the attacks up to the level, and a line saying why the levels differ.

Example:
    >>> from graytune.audit import AuditConfig, run_audit
    >>> report = run_audit("minilm", AuditConfig(levels=("black-box", "dark-gray"), budget=1000))
    >>> report.write("audit-minilm")          # audit.json, audit.png
    >>> report.data["levels"]["dark-gray"]["recommended_quota"]["flags"]
"""

from graytune.audit.config import MAX_BUDGET, AuditConfig
from graytune.audit.data import AuditData, load_audit_data
from graytune.audit.meter import CallMeter
from graytune.audit.quota import combine, recommend
from graytune.audit.report import AuditReport, plot_audit
from graytune.audit.run import run_audit

__all__ = ["MAX_BUDGET", "AuditConfig", "AuditData", "AuditReport", "CallMeter", "combine", "load_audit_data",
           "plot_audit", "recommend", "run_audit"]
