"""The exposure audit: what a client at each access level could extract, measured in boundary calls.

``run_audit`` attacks a backbone (in process or behind ``graytune serve``) as a client at each level
would, within a budget of calls, and reports the fidelity reached against the calls spent:

- functional extraction: a small surrogate distilled from outputs (black-box), and from VJPs too
  (Jacobian matching, dark-gray and up), scored by held-out cosine and by its linear-probe accuracy
  on a real task as a fraction of the backbone's;
- the token-embedding table: its relative geometry recovered by gradient descent through VJPs
  (dark-gray and up), and its exact rows under a ``read`` grant;
- the duplicate-row batch: a whole Jacobian from one forward and one VJP.

Each level gets a recommended quota: 10x below the calls at which the surrogate reaches 90 % of the
backbone's probe accuracy, or "not reached within the budget".

Example:
    >>> from graytune.audit import AuditConfig, run_audit
    >>> report = run_audit("minilm", AuditConfig(levels=("black-box", "dark-gray"), budget=1000))
    >>> report.write("audit-minilm")          # audit.json, audit.png
    >>> report.data["levels"]["dark-gray"]["recommended_quota"]
"""

from graytune.audit.config import MAX_BUDGET, AuditConfig
from graytune.audit.data import AuditData, load_audit_data
from graytune.audit.meter import CallMeter
from graytune.audit.report import AuditReport, plot_audit, recommend
from graytune.audit.run import run_audit

__all__ = ["MAX_BUDGET", "AuditConfig", "AuditData", "AuditReport", "CallMeter", "load_audit_data", "plot_audit",
           "recommend", "run_audit"]
