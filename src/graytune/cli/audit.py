"""``graytune audit BACKBONE --access LEVEL... --budget CALLS``: what a client at each level could extract."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import fields

from graytune.config import field_docs

LEVELS = ("black-box", "dark-gray", "light-gray")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from graytune.audit.config import ATTACKS, MAX_BUDGET, AuditConfig

    p = sub.add_parser(
        "audit", help="run the extraction attacks a client at each access level could run, within a call budget",
        description="Attacks a backbone as a client at each level would, within --budget boundary calls per attack "
                    "(a batched forward is one call, a VJP one more): surrogates distilled from outputs and from "
                    "finite differences along edits without gradients (black-box) and from per-token VJPs (dark-gray "
                    "up), the finite-difference Jacobian at black-box, the token-embedding geometry probe and exact "
                    "rows under a read grant (text), and the duplicate-row Jacobian. Writes audit.json and audit.png "
                    "(fidelity against calls per level) with a recommendation per level in graytune serve's units "
                    "(--quota-samples, --quota-grad-rows, --black-box-edits). BACKBONE may be a graytune serve URL "
                    "(http://HOST:PORT, key in $GRAYTUNE_API_KEY).")
    p.add_argument("backbone", help="backbone id (minilm, hf-clip:DIR, ...) or http://HOST:PORT of graytune serve")
    docs = field_docs(AuditConfig)
    for f in fields(AuditConfig):
        if f.name == "levels":
            p.add_argument("--access", dest="levels", nargs="+", required=True, choices=LEVELS, metavar="LEVEL",
                           help=docs[f.name])
        elif f.name == "budget":
            p.add_argument("--budget", type=int, required=True, metavar="CALLS",
                           help=f"{docs[f.name]} At most {MAX_BUDGET:,}.")
        elif f.name == "attacks":
            p.add_argument("--attacks", nargs="+", default=f.default, choices=ATTACKS, metavar="ATTACK",
                           help=f"{docs[f.name]} (default: all)")
        elif f.name == "reads":
            p.add_argument("--reads", nargs="*", default=(), metavar="PORT", help=docs[f.name])
        elif f.name == "modality":
            p.add_argument("--modality", default=f.default, choices=("auto", "text", "image"), help=docs[f.name])
        else:
            shown = f" (default: {f.default})" if f.default not in ("", None) else ""  # empty: its doc says the default
            p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                           help=f"{docs[f.name]}{shown}")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for audit.json and audit.png (default: audit-BACKBONE in the current folder)")
    p.add_argument("--overwrite", action="store_true", help="replace audit.json and audit.png in --out")
    p.add_argument("--json", action="store_true", help="print the whole report as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from graytune.audit import AuditConfig, run_audit
    from graytune.audit.report import FIGURE_FILE, JSON_FILE
    from graytune.errors import InvalidInputError

    config = AuditConfig(**{f.name: tuple(v) if isinstance(v := getattr(args, f.name), list) else v
                            for f in fields(AuditConfig)})
    config.check()  # every problem at once, before a backbone loads
    out = Path(args.out or "audit-" + re.sub(r"[^A-Za-z0-9._+-]+", "-", args.backbone).strip("-"))
    taken = [str(out / name) for name in (JSON_FILE, FIGURE_FILE) if (out / name).exists()]
    if taken and not args.overwrite:
        raise InvalidInputError(f"{', '.join(taken)} exist; choose another --out or pass --overwrite")
    report = run_audit(args.backbone, config, progress=not args.no_progress)
    paths = report.write(out, overwrite=True)
    if args.json:
        print(json.dumps({**report.data, "files": {k: str(v) for k, v in paths.items()}}))
        return 0
    _summary(report.data)
    print(f"wrote {paths['json']} and {paths['figure']}")
    return 0


def _summary(data: dict) -> None:
    ref = data["reference"]
    print(f"audit of {data['backbone']} ({data['modality']} tower, {data['rows_per_call']} rows per call, budget "
          f"{data['budget']:,} calls per attack); the backbone's linear probe on {data['data']['name']}: "
          f"{100 * ref['probe_accuracy']:.1f} %")
    for name, level in data["levels"].items():
        print(f"{name}:")
        for mode, extraction in level["extraction"].items():
            last = extraction["checkpoints"][-1]
            print(f"  surrogate from {mode} after {last['calls']:,} calls ({last['samples']:,} samples, "
                  f"{last['grad_rows']:,} gradient rows, {last.get('edit_rows', 0):,} edit rows): probe "
                  f"{100 * last['probe_ratio']:.0f} % of the backbone's, agreement {100 * last['agreement']:.0f} %, "
                  f"held-out cosine {last['cosine']:.3f}, explained variance {last['explained_variance']:.3f}")
            if extraction.get("stopped"):
                print(f"    stopped early: {extraction['stopped']}")
        _quota(level["recommended_quota"])
        _jacobians(level)


def _quota(quota: dict) -> None:
    flags = " ".join(f"{flag} {value}" for flag, value in quota["flags"].items() if value is not None)
    print(f"  recommended for a key at this level: {flags or 'nothing measurable (see audit.json)'}")
    for key in ("samples", "grad_rows"):
        if quota[key].get("note"):
            print(f"    {key.replace('_', ' ')}: {quota[key]['note']}")
    edits = quota["edits"]
    if edits.get("policy"):
        watch = f" (the differences attack's quota: {edits['edit_rows']:,})" if edits.get("edit_rows") else ""
        print(f"    edits: --black-box-edits {edits['policy']} where no key trains zeroth-order input adapters; "
              f"{edits['for_zeroth_order_keys']} where one does (dga-zo, prompt-zo), and watch each key's "
              f"black_box_edit_rows on /v1/stats{watch}")
    print(f"  why: {quota['why']}")


def _jacobians(level: dict) -> None:
    differences = level.get("finite_differences", {})
    if differences.get("status") in ("recovered", "partial"):
        error = f", relative error {differences['relative_error']:.1e} against the VJP" \
            if "relative_error" in differences else ""
        print(f"  finite differences: {differences['columns']:,} of {differences['columns_needed']:,} Jacobian "
              f"columns in {differences['spent']['calls']} calls, {differences['spent']['samples']:,} samples, "
              f"no gradient{error}")
    elif differences:
        print(f"  finite differences: {differences['status']} ({differences.get('reason') or differences.get('stopped')})")
    dup = level.get("duplicate_rows", {})
    if dup.get("status") in ("recovered", "partial"):
        print(f"  duplicate rows: {dup['compression']} (finite-difference error {dup['finite_difference_error']})")
    elif dup:
        print(f"  duplicate rows: {dup['status']} ({dup.get('reason') or dup.get('stopped')})")
    geometry = level.get("embedding_geometry", {})
    if "pairwise_cosine_correlation" in geometry:
        print(f"  token-embedding geometry of {geometry['tokens']} tokens in {geometry['spent']['calls']} calls: "
              f"pairwise-cosine correlation {geometry['pairwise_cosine_correlation']:.2f}, row error "
              f"{geometry['row_error']:.2f}")
    rows = level.get("exact_rows")
    if rows:
        print(f"  read grant: {rows['rows_read']:,} of {rows['vocab']:,} embedding rows in "
              f"{rows['spent']['calls']} calls (exact: the grant hands them over)")
