"""``graytune info BACKBONE``: the spec a client sees at one access level, and what each level's operations
reveal; never weights."""

from __future__ import annotations

import argparse
import json

from graytune.access import known_backbones, open_backbone
from graytune.types import AccessLevel, BackboneSpec

#: (level, what the row needs of the backbone, operation, what it reveals); "read" and "grant" rows need the
#: owner's grant, not a level
REVEALS = (
    ("black-box", "", "forward on raw inputs", "outputs (embeddings, logits)"),
    ("black-box", "lm", "text.target_logprobs", "log-probs of the targets sent (a full distribution costs V rows "
                                                "per position)"),
    ("black-box", "lm", "generate", "sampled tokens"),
    ("black-box", "text", "add/insert at text.token_embeds", "Jacobian columns by finite differences; the owner's "
                                                            "grant (graytune serve --black-box-edits)"),
    ("black-box", "image", "image.pixels moved by +-eps", "Jacobian columns by finite differences; inherent "
                                                          "(pixels are continuous)"),
    ("black-box", "latents", "unet.prediction for latents.noisy and timestep", "the UNet's output; latents are "
                                                                              "continuous, so +-eps moves give its "
                                                                              "Jacobian columns (inherent)"),
    ("black-box", "latents", "image.latents for image.pixels", "the VAE encoder's output (forward only: never a "
                                                               "gradient)"),
    ("dark-gray", "", "add/insert at input ports, gradients", "exact VJPs at the input ports"),
    ("light-gray", "", "add/insert at entry ports, gradients", "exact VJPs at the entry ports (<m>.layer.k)"),
    ("read", "text", "read at text.token_embeds", "weights: the token-table rows of the tokens sent"),
    ("grant", "lm", "top_k=k: text.top_ids, text.top_logprobs", "k values of the next-token distribution per "
                                                                "position (graytune serve --grant-topk K, k <= K <= "
                                                                "20); full-vocabulary logits never cross"),
)


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
    print()
    _print_table(rows)
    print("\nread at input and entry ports needs the owner's explicit grant (it reveals weights)")
    print(f"\nwhat each operation reveals (here: allowed at {handle.access.label}; a level allows the rows of the "
          "levels before it)")
    _print_table(reveals(spec, handle.access))
    return 0


def reveals(spec: BackboneSpec, access: AccessLevel) -> list[tuple[str, str, str, str]]:
    """Rows ``(level, allowed here, operation, what it reveals)`` of ``REVEALS`` that apply to ``spec``'s backbone;
    ``allowed here`` says whether a handle at ``access`` may do it (``grant`` for reads)."""
    kinds = set(spec.modalities) | ({"lm"} if "text.target_logprobs" in spec.port_names() else set())
    rows = [("level", "here", "operation", "reveals")]
    for level, needs, operation, what in REVEALS:
        if needs and needs not in kinds:
            continue
        here = "grant" if level in ("read", "grant") else ("yes" if AccessLevel.parse(level) <= access else "no")
        rows.append((level, here, operation, what))
    return rows


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _short(value: object) -> str:
    """A preprocessing value as one short line (a chat template is named, not printed: --json has it whole)."""
    text = str(value)
    return text if len(text) <= 120 and "\n" not in text else f"({len(text)} characters; --json prints it)"
