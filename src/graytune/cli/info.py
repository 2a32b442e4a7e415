"""``graytune info BACKBONE``: the spec a client sees at one access level; never weights."""

from __future__ import annotations

import argparse
import json

from graytune.access import known_backbones, open_backbone
from graytune.types import AccessLevel


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a backbone's ports, shapes, access level and fingerprint",
                       description="Print the spec a client sees: ports, shapes, dtypes, ops, preprocessing, "
                                   "fingerprint. Never weights. Backbones: " + ", ".join(known_backbones()))
    p.add_argument("backbone", help="backbone id, e.g. minilm or bridge:efficientnet-lite0+minilm")
    p.add_argument("--access", default="dark-gray", choices=[lvl.label for lvl in AccessLevel],
                   help="the access level whose view to show (default: dark-gray)")
    p.add_argument("--json", action="store_true", help="print the spec as one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    handle = open_backbone(args.backbone, access=args.access)
    spec = handle.spec
    if args.json:
        print(json.dumps({**spec.to_dict(), "access": handle.access.label}, indent=2, sort_keys=True))
        return 0
    print(f"backbone     {spec.id}")
    print(f"access       {handle.access.label}")
    print(f"modalities   {', '.join(spec.modalities)}")
    print(f"fingerprint  {spec.fingerprint}")
    print(f"about        {spec.description}")
    for modality, pre in spec.preprocess.items():
        print(f"preprocess   {modality}: " + ", ".join(f"{k}={_short(v)}" for k, v in pre.items()))
    rows = [("port", "kind", "shape", "dtype", "ops")]
    rows += [(p.name, p.kind.value, "[" + ", ".join(map(str, p.shape)) + "]", p.dtype,
              ",".join(o.value for o in p.ops)) for p in spec.ports]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("\nread at input and entry ports needs the owner's explicit grant (it reveals weights)")
    return 0


def _short(value: object) -> str:
    """A preprocessing value as one short line (a chat template is named, not printed: --json has it whole)."""
    text = str(value)
    return text if len(text) <= 120 and "\n" not in text else f"({len(text)} characters; --json prints it)"
