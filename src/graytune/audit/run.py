"""One audit: every attack a client at each level could run, within the budget, scored against the owner's truth.

The attacker's handle at each level is a fresh one (its own exposure record) holding exactly what
that level and the granted ``reads`` allow. The owner's side (the backbone's own embeddings and probe,
the true token rows, finite-difference checks) goes through a separate handle: those are evaluation
calls, reported apart and never charged to an attack. In process the owner holds the backbone, so
everything is scored; against a server, what the server does not grant (the true token rows) is left
unscored and the report says so.

Example:
    >>> report = run_audit("minilm", AuditConfig(levels=("black-box", "dark-gray"), budget=1000))
    >>> report.write("audit-minilm")
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch

from graytune.access import Handle, open_backbone
from graytune.audit.config import DEFAULT_DATA, AuditConfig
from graytune.audit.data import AuditData, load_audit_data
from graytune.audit.differences import finite_difference_jacobian
from graytune.audit.extraction import Reference, extract
from graytune.audit.geometry import PORT, embedding_geometry, read_rows
from graytune.audit.jacobian import duplicate_row_jacobian
from graytune.audit.probe import accuracy, linear_probe
from graytune.audit.quota import combine, recommend
from graytune.audit.report import AuditReport, jsonable
from graytune.audit.towers import Probe, TextTower, Tower, tower_for
from graytune.errors import AccessDeniedError, InvalidInputError
from graytune.types import AccessLevel, Op, required_level

log = logging.getLogger(__name__)
Tensor = torch.Tensor

COUNTING = ("one batched forward is one call whatever its batch, and one VJP is one more call (a second request "
            "to a server); samples are rows sent forward, grad_rows rows whose VJP came back (what graytune serve's "
            "--quota-samples and --quota-grad-rows bound), edit_rows rows of a call that added at text.token_embeds "
            "with no gradient asked (what --black-box-edits is about); tokenizing is not counted (the tokenizer is "
            "public); the owner's evaluation calls are counted apart and never charged to an attack")


def run_audit(backbone: str, config: AuditConfig, *, api_key: str | None = None, data: AuditData | None = None,
              progress: bool = True) -> AuditReport:
    """Attack ``backbone`` at each level of ``config`` and report fidelity against calls.

    Args:
        backbone: an in-process id (``minilm``, ``hf-clip:DIR``) or a server's ``http://host:port``.
        config: levels, budget, batch, probe settings (checked first, every problem at once).
        api_key: a server's key (default ``$GRAYTUNE_API_KEY``).
        data: the attacker's pool and the probe sets; default ``wordnet-supersense`` (text) or
            ``fashion-mnist`` (image).
        progress: progress bars on stderr.

    Returns:
        An ``AuditReport`` (``data``: plain JSON-able findings; ``write(dir)``: JSON and figure).
    """
    config.check()
    with contextlib.ExitStack() as opened:
        return _run(backbone, config, api_key, data, progress, opened)


def _run(backbone: str, config: AuditConfig, api_key: str | None, data: AuditData | None, progress: bool,
         opened: contextlib.ExitStack) -> AuditReport:
    started = time.monotonic()
    levels = config.access_levels()
    top = levels[-1]
    served = backbone.startswith(("http://", "https://"))
    extra: dict[str, Any] = {"api_key": api_key, "opened": opened} if served else {}
    attacker_top = _open(backbone, top, _reads_at(config.reads, top, None), extra)
    spec = attacker_top.spec
    tower = tower_for(spec, config.modality, config.image_size, attacker_top.tokenize)
    if data is None:
        name = config.data or DEFAULT_DATA[tower.modality]
        data = load_audit_data(tower.modality, name, config.probe_train, config.probe_test, config.seed)
    elif data.modality != tower.modality:
        raise InvalidInputError(f"the audit data is for the {data.modality} tower; this audit attacks the "
                                f"{tower.modality} tower")
    owner = _fresh(attacker_top, backbone, top, attacker_top.grants, extra)
    truth, truth_owner = _truth(backbone, attacker_top, tower, levels, extra)
    reference = _reference(owner, tower, data, config.rows)
    scorer = _gradient_owner(owner, backbone, extra)
    findings: dict[str, dict[str, Any]] = {}
    for level in levels:
        handle = _fresh(attacker_top, backbone, level, _reads_at(config.reads, level, spec), extra)
        findings[level.label] = _attack_level(handle, tower, data, reference, scorer or owner, truth, config,
                                              progress)
    combine(findings, config.rows)
    owners = [h for h in {id(h): h for h in (owner, truth_owner, scorer) if h is not None}.values()]
    return AuditReport(jsonable({
        "backbone": backbone, "fingerprint": spec.fingerprint, "served": served, "modality": tower.modality,
        "output": tower.output, "rows_per_call": config.rows, "budget": config.budget, "counting": COUNTING,
        "data": data.describe(),
        "reference": {"probe_accuracy": round(reference.accuracy, 4), "evaluation_calls": reference.calls,
                      "probe": "multinomial logistic regression on standardised features (L-BFGS, L2 1e-3)"},
        "levels": findings,
        "total_attack_calls": sum(_calls(f) for f in findings.values()),
        "owner_evaluation_calls": sum(h.exposure.forward_queries + h.exposure.gradient_queries for h in owners),
        "owner_evaluation_samples": sum(h.exposure.forward_samples for h in owners),
        "seconds": round(time.monotonic() - started, 1),
        "caveats": _caveats(tower, config),
    }))


def _open(backbone: str, level: AccessLevel, reads: Any, extra: dict[str, Any]) -> Handle:
    """``open_backbone``; a server's handle is closed when the audit ends."""
    options = {k: v for k, v in extra.items() if k != "opened"}
    handle = open_backbone(backbone, level, reads=list(reads), **options)
    if "opened" in extra and hasattr(handle, "close"):
        extra["opened"].callback(handle.close)
    return handle


def _attack_level(handle: Handle, tower: Tower, data: AuditData, reference: Reference, owner: Handle,
                  truth: Any, config: AuditConfig, progress: bool) -> dict[str, Any]:
    level = handle.access
    grad = tower.can_grad(level)
    found: dict[str, Any] = {"reads": sorted(handle.grants), "extraction": {}}
    for probe in _probes(tower, level, config):
        found["extraction"][probe.mode] = extract(handle, tower, data, reference, probe, config, progress)
    found["extraction_quota"] = {mode: recommend(result["checkpoints"], config.budget)
                                 for mode, result in found["extraction"].items()}
    if level < AccessLevel.DARK_GRAY:
        found["finite_differences"] = finite_difference_jacobian(handle, tower, data.test_items[:1], owner,
                                                                 config.budget, config.fd_epsilon)
    if not grad:
        reason = "no gradient crosses a black-box boundary" if level < AccessLevel.DARK_GRAY else \
            f"{tower.grad_port} takes no add here"
        found["duplicate_rows"] = {"status": "not applicable", "reason": reason}
    else:
        found["duplicate_rows"] = duplicate_row_jacobian(handle, tower, data.test_items[:1], owner, config.budget,
                                                         config.seed)
    if isinstance(tower, TextTower):
        if grad:
            found["embedding_geometry"] = embedding_geometry(
                handle, data.pool, truth, min(config.budget, config.geometry_calls), config.geometry_tokens,
                config.seed, progress)
        else:
            found["embedding_geometry"] = {"status": "not applicable",
                                           "reason": "the probe learns rows by gradient descent through VJPs"}
        if PORT in handle.grants:
            found["exact_rows"] = read_rows(handle, tower.vocab, _read_width(handle), truth, config.budget,
                                            config.seed)
    return found


def _probes(tower: Tower, level: AccessLevel, config: AuditConfig) -> list[Probe]:
    """The extraction attacks a client at ``level`` runs (of ``config.attacks``): outputs alone and finite
    differences at black-box, the per-token VJP attack from dark-gray up (the attacks below it are the lower
    levels' and are not rerun)."""
    if level >= AccessLevel.DARK_GRAY:
        probes = [Probe("vjp", config.cotangents)] if tower.can_grad(level) else [Probe("outputs")]
    else:
        probes = [Probe("outputs")] + ([Probe("differences", config.fd_edits, config.fd_epsilon)]
                                       if tower.can_edit(level) else [])
    return [p for p in probes if p.mode in config.attacks]


def _reads_at(reads: tuple[str, ...], level: AccessLevel, spec: Any) -> list[str]:
    """The granted reads a handle at ``level`` may hold (all of them when the spec is not known yet)."""
    if spec is None:
        return list(reads)
    return [name for name in reads if required_level(spec.port(name).kind, Op.READ, False) <= level]


def _fresh(top: Handle, backbone: str, level: AccessLevel, reads: Any, extra: dict[str, Any]) -> Handle:
    """A new handle (its own exposure) at ``level``: in process from ``top`` (keeping the grants ``level`` may
    hold, which are ``reads``), else a new server handle."""
    at_level = getattr(top, "at_level", None)
    if at_level is not None:
        return at_level(level)
    return _open(backbone, level, reads, extra)


def _gradient_owner(owner: Handle, backbone: str, extra: dict[str, Any]) -> Handle | None:
    """The owner's handle for exact Jacobians (scoring the finite differences): ``owner`` from dark-gray up, else
    one opened at dark-gray, or ``None`` where the server grants none."""
    if owner.access >= AccessLevel.DARK_GRAY:
        return owner
    try:
        return _open(backbone, AccessLevel.DARK_GRAY, [], extra)
    except AccessDeniedError:
        log.info("the server grants no dark-gray handle: the finite-difference Jacobian is left unscored")
        return None


def _truth(backbone: str, top: Handle, tower: Tower, levels: list[AccessLevel],
           extra: dict[str, Any]) -> tuple[Any, Handle | None]:
    """The owner's token rows (``ids [N] → [N, D]``) for scoring and the handle reading them, or ``None``
    where no read is granted (a server that does not grant it)."""
    if not isinstance(tower, TextTower) or levels[-1] < AccessLevel.DARK_GRAY:
        return None, None
    try:
        owner = _fresh(top, backbone, levels[-1], [PORT], extra) if PORT in top.grants else \
            _open(backbone, levels[-1], [PORT], extra)
    except AccessDeniedError:
        log.info("the server grants no read of %s: the geometry probe is left unscored", PORT)
        return None, None

    def rows(ids: Tensor) -> Tensor:
        with torch.no_grad():
            return owner.forward({"text.input_ids": ids.view(1, -1)}, outputs=[], reads=[PORT])[PORT][0]

    return rows, owner


def _reference(owner: Handle, tower: Tower, data: AuditData, rows: int) -> Reference:
    """The backbone's embeddings of the probe sets and its own linear probe (owner's evaluation calls)."""
    def embed(items: Any) -> Tensor:
        out = []
        with torch.no_grad():
            for start in range(0, len(items), max(rows, 64)):
                out.append(tower.forward(owner, tower.prepare(items[start:start + max(rows, 64)])).float())
        return torch.cat(out)

    train, test = embed(data.train_items), embed(data.test_items)
    predictions = linear_probe(train, data.train_labels, test, len(data.class_names))
    calls = owner.exposure.forward_queries
    return Reference(train, test, predictions, accuracy(predictions, data.test_labels), calls)


def _read_width(handle: Handle) -> int:
    text = handle.spec.preprocess.get("text", {})
    return int(min(512, text.get("max_positions", text.get("max_tokens", 512))))


def _calls(found: dict[str, Any]) -> int:
    """The calls every attack of one level spent (its extraction curves included)."""
    parts = [*found.values(), *found.get("extraction", {}).values()]
    return sum(part["spent"]["calls"] for part in parts if isinstance(part, dict) and "spent" in part)


def _caveats(tower: Tower, config: AuditConfig) -> list[str]:
    notes = [
        "a lower bound: these are the attacks this audit runs, with a small student; a stronger student, better "
        "queries or more compute extract more from the same calls",
        "a level's recommended quota is the lowest among the attacks up to it: a client at a level can run the "
        "attacks below it (a dark-gray key can spend its samples on outputs alone)",
        f"calls depend on the batch: {config.rows} rows per call here; a server bounds rows per call only through "
        "--max-tokens/--max-pixels, so size quotas in samples and gradient rows as well as calls",
        "the VJP attacks use gradients at the input port only; light-gray entry-port gradients, and reads granted "
        "at entry ports, are not exploited",
        "the probe measures one task: 90 % of the backbone's probe accuracy there is not 90 % of the backbone",
    ]
    if isinstance(tower, TextTower):
        notes.append(f"the text student is a bag of token rows with positions and one attention layer "
                     f"(about half of MiniLM's size, its token table included), not a copy of the backbone; "
                     f"per-token edits and VJPs are kept for the first {tower.grad_width} positions of a text")
    return notes
