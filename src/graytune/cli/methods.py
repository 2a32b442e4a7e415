"""``graytune methods``: the table to consult before choosing a method (all of it from the registry)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the adaptation methods: access level, grants, ports, options, lr",
                       description="The table to consult before choosing a method, all of it from the method "
                                   "registry: the lowest access level each needs, the read grants it asks the owner "
                                   "for, the ports it touches, its default learning rate, what it trains and its "
                                   "options (graytune train --option KEY=VALUE) with their defaults.")
    p.add_argument("names", nargs="*", metavar="METHOD", help="only these methods (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from graytune.methods import METHODS, MethodKind, get_method

    chosen = [get_method(n) for n in args.names] if args.names else list(METHODS.values())
    if args.json:
        print(json.dumps([m.to_dict() for m in chosen], indent=2))
        return 0
    kinds = {"encoder": "enc", "causal-lm": "LM", "diffusion": "SD"}
    rows = [(m.name, m.min_access.label, f"{m.lr:g}" if m.lr is not None else "-",
             "+".join(kinds[k] for k in m.backbones), ", ".join(m.reads) or "-",
             ", ".join(m.ports) or ("the module itself (a copy)" if m.kind is MethodKind.WHITEBOX else "-"))
            for m in chosen]
    name_w, reads_w = (max(len(r[i]) for r in [("method", "", "", "", "reads", ""), *rows]) + 2 for i in (0, 4))
    print(f"{'method':<{name_w}}{'access':<12}{'lr':>8}  {'adapts':<12}{'reads':<{reads_w}}ports touched")
    print("-" * 100)
    for name, access, lr, kind, reads, ports in rows:  # columns as wide as their longest entry
        print(f"{name:<{name_w}}{access:<12}{lr:>8}  {kind:<12}{reads:<{reads_w}}{ports}")
    for m in chosen:
        print(f"\n{m.name} ({m.kind.value}): {m.doc}")
        print(f"  trains: {m.trains}")
        print(f"  made by: {m.trained_by}")
        options = m.options()
        shared = {o.name for o in options if sum(other.name == o.name for other in options) > 1}
        for o in options:  # a key two adapters share is taken only as ADAPTER.KEY: listed so
            default = ",".join(map(str, o.default)) if isinstance(o.default, tuple) else o.default
            key = o.qualified if o.name in shared else o.name
            print(f"  --option {key + '=' + str(default):<34} {o.type:<16} {o.doc}")
    print("\naccess: the lowest level that runs the method; adapts: the backbones it fits (enc: CLIP-like and "
          "text/image encoders; LM: causal language models, where output adapters are left out); reads: ports "
          "whose values the owner must grant (they reveal weights); lr: the default peak learning rate (--lr "
          "overrides). Write an option as KEY, or as ADAPTER.KEY where two adapters share the key (listed so).")
    return 0
